"""The authors' weights in our model give their model's logits.

Their model's forward is transcribed below in float64 numpy from models/ParaFormer.py of
github.com/DUAT-Maker/Shallow-Paraformer (ViP.forward, ParaTransformer, PreNorm, Attention,
FeedForward at 7aa4532; ParaFormer.forward and ParaFormer.Branches at b2cd33d, which name
the branches' modules differently), on NCHW images as they take them; no code of ours is
used for it.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from configs import tiny
from paraformer_jax import authors_weights, input_pipeline, storage, train

BRANCHES, DEPTH, WIDTH, HEADS, MLP, PATCH, CLASSES = 2, 2, 192, 3, 64, 4, 7
VIP = 'paratransformer.blocks.'  # ViP.paratransformer.blocks[i][j]
PARAFORMER = 'paraformerbranches.branches.'  # ParaFormer.paraformerbranches.branches[i][j]


def _authors_state(rng, heads=HEADS, patch=PATCH, channels=3, classes=CLASSES, side=8,
                   depth=DEPTH, layout=VIP):
  """A random state_dict with the authors' names and torch's [out, in] Linear layout."""
  inner = 64 * heads
  tokens = (side // patch) ** 2 + 1
  s = {'to_patch_embedding.1.weight': rng.normal(0, 0.2, (WIDTH, patch * patch * channels)),
       'to_patch_embedding.1.bias': rng.normal(0, 0.2, WIDTH),
       'pos_embedding': rng.normal(0, 1, (1, tokens, WIDTH)),
       'cls_token': rng.normal(0, 1, (1, 1, WIDTH)),
       'mlp_head.0.weight': rng.normal(1, 0.1, WIDTH), 'mlp_head.0.bias': rng.normal(0, 0.1, WIDTH),
       'mlp_head.1.weight': rng.normal(0, 0.1, (classes, WIDTH)),
       'mlp_head.1.bias': rng.normal(0, 0.1, classes)}
  for b in range(BRANCHES):
    for layer in range(2 * depth):
      pre = f'{layout}{b}.{layer}.'
      s[pre + 'norm.weight'] = rng.normal(1, 0.1, WIDTH)
      s[pre + 'norm.bias'] = rng.normal(0, 0.1, WIDTH)
      if layer % 2 == 0:
        s[pre + 'fn.to_qkv.weight'] = rng.normal(0, 0.08, (inner * heads, WIDTH))
        s[pre + 'fn.to_out.0.weight'] = rng.normal(0, 0.08, (WIDTH, inner))
        s[pre + 'fn.to_out.0.bias'] = rng.normal(0, 0.1, WIDTH)
      else:
        s[pre + 'fn.net.0.weight'] = rng.normal(0, 0.08, (MLP, WIDTH))
        s[pre + 'fn.net.0.bias'] = rng.normal(0, 0.1, MLP)
        s[pre + 'fn.net.3.weight'] = rng.normal(0, 0.1, (WIDTH, MLP))
        s[pre + 'fn.net.3.bias'] = rng.normal(0, 0.1, WIDTH)
  return s


def _layer_norm(x, weight, bias):  # torch's nn.LayerNorm: eps 1e-5, biased variance
  mean = x.mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + 1e-5) * weight + bias


def _authors_forward(s, img, p=PATCH, depth=DEPTH, layout=VIP):
  """ViP.forward or ParaFormer.forward in eval mode (dropout off), img [b, c, h, w]."""
  b, c, h, w = img.shape
  # Rearrange('b c (h p1) (w p2) -> b (h w) (p1 p2 c)')
  x = img.reshape(b, c, h // p, p, w // p, p).transpose(0, 2, 4, 3, 5, 1)
  x = x.reshape(b, (h // p) * (w // p), p * p * c)
  x = x @ s['to_patch_embedding.1.weight'].T + s['to_patch_embedding.1.bias']
  x = np.concatenate([np.repeat(s['cls_token'], b, axis=0), x], axis=1) + s['pos_embedding']
  outputs = []
  for i in range(BRANCHES):
    y = x
    for layer in range(2 * depth):
      pre = f'{layout}{i}.{layer}.'
      y = _layer_norm(y, s[pre + 'norm.weight'], s[pre + 'norm.bias'])  # PreNorm
      if layer % 2 == 0:  # Attention(...)(x) + x, x being the normed input
        q, k, v = np.split(y @ s[pre + 'fn.to_qkv.weight'].T, 3, axis=-1)
        q, k, v = (t.reshape(b, -1, HEADS, t.shape[-1] // HEADS).transpose(0, 2, 1, 3)
                   for t in (q, k, v))
        dots = q @ k.transpose(0, 1, 3, 2) * 64 ** -0.5
        attn = np.exp(dots - dots.max(-1, keepdims=True))
        attn /= attn.sum(-1, keepdims=True)
        out = (attn @ v).transpose(0, 2, 1, 3).reshape(b, -1, HEADS * 64)
        y = out @ s[pre + 'fn.to_out.0.weight'].T + s[pre + 'fn.to_out.0.bias'] + y
      else:  # FeedForward: Linear, GELU (exact), Dropout, Linear, Dropout, + x
        hidden = y @ s[pre + 'fn.net.0.weight'].T + s[pre + 'fn.net.0.bias']
        hidden = 0.5 * hidden * (1 + erf(hidden / np.sqrt(2)))
        y = hidden @ s[pre + 'fn.net.3.weight'].T + s[pre + 'fn.net.3.bias'] + y
    outputs.append(y)
  x = np.sum(outputs, axis=0)[:, 0]
  x = _layer_norm(x, s['mlp_head.0.weight'], s['mlp_head.0.bias'])
  return x @ s['mlp_head.1.weight'].T + s['mlp_head.1.bias']


@pytest.mark.parametrize('layout', [VIP, PARAFORMER])
def test_authors_weights_give_the_authors_logits(layout, tmp_path):
  rng = np.random.default_rng(0)
  state = _authors_state(rng, layout=layout)
  np.savez(tmp_path / 'w.npz', **state)
  assert sorted(authors_weights.load_state(str(tmp_path / 'w.npz'))) == sorted(
      _authors_state(rng, layout=VIP))  # either layout loads under ViP's names
  images = rng.normal(0, 1, (3, 8, 8, 3))  # NHWC, ours
  model = authors_weights.model_for(state)
  assert (model.num_branches, model.branch_depth, model.width, model.num_heads, model.mlp_dim,
          model.patch_size, model.num_classes) == (BRANCHES, DEPTH, WIDTH, HEADS, MLP, PATCH,
                                                   CLASSES)
  ours = model.apply({'params': authors_weights.to_params(state)},
                     jnp.asarray(images, jnp.float32))
  want = _authors_forward(state, images.transpose(0, 3, 1, 2), layout=layout)
  assert np.abs(want).max() > 1  # logits of some size, so the tolerance below means something
  np.testing.assert_allclose(np.asarray(ours), want, atol=1e-5, rtol=0)  # float32: 1.6e-6


def test_other_dicts_are_refused_with_the_reason():
  with pytest.raises(ValueError, match='not a state_dict'):
    authors_weights.to_params({'fc.weight': np.zeros((2, 2))})
  # Their chunk(3) is a q/k/v split only with 3 heads: 4 heads' 1024 outputs are not.
  with pytest.raises(ValueError, match='only with 3 heads'):
    authors_weights.to_params(_authors_state(np.random.default_rng(1), heads=4))


def _digits_config():
  """The tiny digits run with the model their weights below fit."""
  config = tiny.get_config()
  m = config.model
  m.width, m.num_heads, m.mlp_dim, m.num_branches, m.branch_depth = WIDTH, HEADS, MLP, 2, 1
  m.patch_size, m.block_style, m.pool = 2, 'reference', 'cls'
  return config


def test_a_workdir_of_their_weights_evaluates_as_their_model(tmp_path):
  """Their weights written as a workdir (npz in, as from their torch checkpoint): the
  checkpoint holds exactly to_params(state), and --mode=eval's test accuracy is that of the
  numpy transcription of their forward on the same test images."""
  config = _digits_config()
  state = _authors_state(np.random.default_rng(4), patch=2, channels=1, classes=10, depth=1)
  path = str(tmp_path / 'theirs.npz')
  np.savez(path, **{'module.' + k: v for k, v in state.items()})  # as DataParallel saves
  out = str(tmp_path / 'workdir')
  val = authors_weights.write_workdir(config, authors_weights.load_state(path), out)
  trainer = train.Trainer(config, out, create=False)
  restored, _ = trainer.restore(0)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.float32(b)),
               restored.params, authors_weights.to_params(state))
  assert trainer.ckpts.best_step() == 0 and 0 < val < 1
  got = train.evaluate_checkpoint(config, out)['prefix_accuracy'][-1]
  test = input_pipeline.split_source(config.data, config.data.test_split)
  images = np.stack([test[i]['image'] for i in range(len(test))]).astype(np.float64)
  images = (images / 255 - config.data.mean) / config.data.std
  logits = _authors_forward(state, images.transpose(0, 3, 1, 2), p=2, depth=1)
  labels = np.array([test[i]['label'] for i in range(len(test))])
  want = (logits.argmax(-1) == labels).mean()
  assert abs(got - want) <= 1 / len(test)  # float32 against float64: one near-tie at most
  assert (storage.path(out) / 'config.py').exists()


def test_weights_that_do_not_fit_the_config_are_refused_with_the_overrides(tmp_path):
  config = _digits_config()
  config.model.width, config.data.image_size = 64, 8
  state = _authors_state(np.random.default_rng(5), patch=2, channels=1, classes=10, depth=1,
                         side=16)
  with pytest.raises(ValueError, match=r'--config.model.width=192 '
                                       r'--config.data.image_size=16'):
    authors_weights.write_workdir(config, state, str(tmp_path / 'out'))
  assert not (tmp_path / 'out').exists()


@pytest.mark.slow
def test_their_weights_written_by_two_processes_are_those_written_by_one(tmp_path):
  """`authors_weights` on 2 processes (the branch axis across them; files from process 0)
  writes the checkpoint and validation accuracy that one process writes."""
  import os
  import subprocess
  import sys
  from multiprocess_test import REPO, _free_port
  config = _digits_config()
  state = _authors_state(np.random.default_rng(4), patch=2, channels=1, classes=10, depth=1)
  path = str(tmp_path / 'theirs.npz')
  np.savez(path, **state)
  one = str(tmp_path / 'one')
  val = authors_weights.write_workdir(config, authors_weights.load_state(path), one)
  two, port = str(tmp_path / 'two'), _free_port()
  m = config.model
  cmd = [sys.executable, '-m', 'paraformer_jax.authors_weights', '--config=configs/tiny.py',
         f'--weights={path}', f'--out={two}', f'--config.model.width={m.width}',
         f'--config.model.num_heads={m.num_heads}', f'--config.model.mlp_dim={m.mlp_dim}',
         '--config.model.num_branches=2', '--config.model.branch_depth=1',
         '--config.model.patch_size=2', '--config.model.block_style=reference',
         '--config.model.pool=cls', '--config.mesh.data=1', '--config.mesh.branch=2',
         f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2']
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=1')
  procs = [subprocess.Popen(cmd + [f'--process_id={i}'], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
  outs = [p.communicate(timeout=300)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
  assert f'{two}: their weights, validation accuracy {100 * val:.2f}%' in outs[0]
  assert 'their weights' not in outs[1]
  got, want = (train.Trainer(config, w, create=False).restore(0)[0].params for w in (two, one))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               got, want)


class _RunsCode:
  """An object whose unpickling would run a command."""

  def __reduce__(self):
    return (os.system, ('touch ran',))


def test_a_weights_file_holding_more_than_arrays_runs_no_code(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  state = _authors_state(np.random.default_rng(0), layout=VIP)
  np.savez(tmp_path / 'w.npz', **state, extra=np.array([_RunsCode()], dtype=object))
  with pytest.raises(ValueError, match=r'^--weights=.*w\.npz holds more than arrays \(pickled '
                                       r'Python objects, which could run code when loaded\), so '
                                       r'it is refused: save the state_dict\'s tensors alone'):
    authors_weights.load_state(str(tmp_path / 'w.npz'))
  assert not os.path.exists(tmp_path / 'ran')
