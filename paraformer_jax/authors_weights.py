"""The authors' PyTorch weights as our parameters: compare, evaluate or fine-tune their models.

The authors' models are in models/ParaFormer.py of github.com/DUAT-Maker/Shallow-Paraformer,
in two layouts of the same computation: `ViP` (its branches named `paratransformer.blocks.{i}.
{j}.*`, the file at commit 7aa4532) and `ParaFormer`, which their train_ParaFormer.py builds and
saves (`paraformerbranches.branches.{i}.{j}.*`; the file was models/ParaFormer2.py until
b2cd33d). Both `state_dict`s load. Their computation is our `block_style='reference'`,
`pool='cls'` model: the same patch order, LayerNorm epsilon (1e-5), residuals, exact GELU
and bias-free qkv, so the same weights give the same logits (`tests/authors_weights_test.py`
against a numpy transcription of their forward; `benchmarks/authors_pytorch.py` against
their code itself).

  state = authors_weights.load_state(path)  # {name: numpy array}; .t7/.pt need torch, .npz not
  params = authors_weights.to_params(state)
  model = authors_weights.model_for(state, num_classes=10)   # reference style, cls pooling
  logits = model.apply({'params': params}, images)           # images NHWC, as ours

Or as a workdir that `--mode=eval`, `compress` and `config.init_from` (fine-tuning) take:

  python -m paraformer_jax.authors_weights --config=configs/cifar10.py \
      --weights=their_checkpoint.t7 --out=/tmp/pf_authors_c10
  python -m paraformer_jax.main --config=/tmp/pf_authors_c10/config.py \
      --workdir=/tmp/pf_authors_c10 --mode=eval

`--weights` is their saved state_dict (torch needed to read it) or an .npz of its arrays
(`np.savez(path, **{k: v.numpy() for k, v in state_dict.items()})`), which needs no torch.

Their attention splits `to_qkv`'s output into q, k, v with `chunk(3)`, which is only a
multi-head split when heads x 64 x heads = 3 x heads x 64, i.e. with 3 heads (the papers'
setting); other head counts are refused.
"""
import io
import math
import re
from typing import Mapping

import jax
import numpy as np
from absl import flags
from ml_collections import config_flags

from paraformer_jax import cli, processes, run_checks, storage, train
from paraformer_jax.model import HEAD_DIM, ParaFormer

_BLOCK = re.compile(r'paratransformer\.blocks\.(\d+)\.(\d+)\.')
# ParaFormer's names for ViP's: the same modules, the same shapes.
_PARAFORMER_BRANCHES = 'paraformerbranches.branches.'
_VIP_BLOCKS = 'paratransformer.blocks.'


def _vip_names(state: Mapping[str, np.ndarray]) -> dict:
  return {_VIP_BLOCKS + k.removeprefix(_PARAFORMER_BRANCHES)
          if k.startswith(_PARAFORMER_BRANCHES) else k: v for k, v in state.items()}


def _sizes(state: Mapping[str, np.ndarray]) -> dict:
  """ParaFormer's size arguments read off the shapes of the authors' state_dict."""
  state = _vip_names(state)
  found = [m for m in map(_BLOCK.match, state) if m]
  if not found or 'to_patch_embedding.1.weight' not in state:
    raise ValueError("This is not a state_dict of the authors' ParaFormer or ViP "
                     '(models/ParaFormer.py): no paraformerbranches.branches.* or '
                     'paratransformer.blocks.* entries, or no to_patch_embedding.1.weight. '
                     'Pass the dict their train_ParaFormer.py saves (net.state_dict()).')
  width, patch_dim = state['to_patch_embedding.1.weight'].shape
  channels = 3 if patch_dim % 3 == 0 and math.isqrt(patch_dim // 3) ** 2 == patch_dim // 3 else 1
  heads = state['paratransformer.blocks.0.0.fn.to_out.0.weight'].shape[1] // HEAD_DIM
  qkv_rows = state['paratransformer.blocks.0.0.fn.to_qkv.weight'].shape[0]
  if qkv_rows != 3 * heads * HEAD_DIM:
    raise ValueError(f"to_qkv has {qkv_rows} outputs for {heads} heads: the authors' "
                     f'chunk(3) split is a multi-head q/k/v split only with 3 heads of '
                     f'{HEAD_DIM} (576 outputs); such a model has no equivalent here.')
  return dict(patch_size=math.isqrt(patch_dim // channels), width=width, num_heads=heads,
              mlp_dim=state['paratransformer.blocks.0.1.fn.net.0.weight'].shape[0],
              num_branches=1 + max(int(m.group(1)) for m in found),
              branch_depth=(1 + max(int(m.group(2)) for m in found)) // 2)


def model_for(state: Mapping[str, np.ndarray], num_classes: int | None = None,
              **kwargs) -> ParaFormer:
  """The ParaFormer that `to_params(state)` fits (reference style, cls pooling); `kwargs`
  (dropout, dtype, branch_strategy, ...) pass through."""
  return ParaFormer(num_classes=num_classes or state['mlp_head.1.weight'].shape[0],
                    block_style='reference', pool='cls', **_sizes(state), **kwargs)


def to_params(state: Mapping[str, np.ndarray]) -> dict:
  """Our params tree (float32 numpy) from the authors' `state_dict` (name -> array), in
  either layout."""
  state = {k: np.asarray(v, np.float32) for k, v in _vip_names(state).items()}
  sizes = _sizes(state)
  branches, depth, width = sizes['num_branches'], sizes['branch_depth'], sizes['width']
  heads = sizes['num_heads']

  def stacked(layer: int, name: str, fn=lambda w: w):
    return np.stack([fn(state[f'paratransformer.blocks.{b}.{layer}.{name}'])
                     for b in range(branches)])

  def norm(layer):
    return {'scale': stacked(layer, 'norm.weight'), 'bias': stacked(layer, 'norm.bias')}

  blocks = {}
  for j in range(depth):
    a, m = 2 * j, 2 * j + 1  # their Sequential: PreNorm(Attention), PreNorm(FeedForward)
    blocks[f'block{j}'] = {
        'norm1': norm(a),
        'attn': {
            # Linear(D, 3 * heads * 64).weight is [out, in]; out = (q|k|v, head, dim).
            'qkv': {'kernel': stacked(a, 'fn.to_qkv.weight',
                                      lambda w: w.T.reshape(width, 3, heads, HEAD_DIM))},
            'out': {'kernel': stacked(a, 'fn.to_out.0.weight',
                                      lambda w: w.T.reshape(heads, HEAD_DIM, width)),
                    'bias': stacked(a, 'fn.to_out.0.bias')},
        },
        'norm2': norm(m),
        'mlp': {
            'fc1': {'kernel': stacked(m, 'fn.net.0.weight', np.transpose),
                    'bias': stacked(m, 'fn.net.0.bias')},
            'fc2': {'kernel': stacked(m, 'fn.net.3.weight', np.transpose),
                    'bias': stacked(m, 'fn.net.3.bias')},
        },
    }
  return {
      'embed': {'patch': {'kernel': state['to_patch_embedding.1.weight'].T,
                          'bias': state['to_patch_embedding.1.bias']},
                'cls': state['cls_token'], 'pos': state['pos_embedding']},
      'branches': {'branch': blocks},
      'head': {'norm': {'scale': state['mlp_head.0.weight'], 'bias': state['mlp_head.0.bias']},
               'out': {'kernel': state['mlp_head.1.weight'].T,
                       'bias': state['mlp_head.1.bias']}},
  }


def load_state(path: str) -> dict:
  """Their state_dict as {name: numpy array}, from an .npz or a torch checkpoint (local or
  gs://), under ViP's names whichever layout saved it. DataParallel's 'module.' prefix is
  dropped."""
  file = storage.path(path)
  if not file.exists():
    raise FileNotFoundError(f'--weights={path} does not exist: pass the file their training '
                            'saved (net.state_dict()), or an .npz of its arrays.')
  data = file.read_bytes()
  # A file from elsewhere runs no code here: arrays only, never arbitrary unpickling.
  needs_more = (f'--weights={path} holds more than arrays (pickled Python objects, which '
                f'could run code when loaded), so it is refused: save the state_dict\'s '
                f'tensors alone, e.g. np.savez(PATH.npz, **{{k: v.numpy() for k, v in '
                f'state_dict.items()}}).')
  if path.endswith('.npz'):
    try:
      with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        state = {k: npz[k] for k in npz.files}
    except ValueError as e:
      if 'allow_pickle' in str(e):
        raise ValueError(needs_more) from None
      raise
  else:
    try:
      import torch  # pylint: disable=import-outside-toplevel
    except ImportError:
      raise ValueError(f'--weights={path}: reading a torch checkpoint needs torch. Install it, '
                       'or save the arrays once where torch is: np.savez(PATH.npz, **{k: '
                       'v.numpy() for k, v in torch.load(PATH).items()}).') from None
    import pickle  # pylint: disable=import-outside-toplevel
    try:  # tensors, dicts and numbers only (torch's default before 2.6 unpickled anything)
      loaded = torch.load(io.BytesIO(data), map_location='cpu', weights_only=True)
    except pickle.UnpicklingError:
      raise ValueError(needs_more) from None
    state = {k: v.numpy() for k, v in loaded.get('state_dict', loaded).items()}
  return _vip_names({k.removeprefix('module.'): v for k, v in state.items()})


def check_config(config, state: Mapping[str, np.ndarray]):
  """Refuses a config whose model the weights do not fit, naming the overrides that fit."""
  want = dict(_sizes(state), block_style='reference', pool='cls', posemb='learned',
              pre_logits=False)
  fixes = [f'--config.model.{k}={v}' for k, v in want.items() if config.model[k] != v]
  classes = state['mlp_head.1.weight'].shape[0]
  if config.data.num_classes != classes:
    fixes.append(f'--config.data.num_classes={classes}')
  tokens = state['pos_embedding'].shape[1] - 1
  side = math.isqrt(tokens) * want['patch_size']
  if config.data.image_size != side:
    fixes.append(f'--config.data.image_size={side}')
  if fixes:
    raise ValueError('The weights do not fit the config\'s model. To match them, add: ' +
                     ' '.join(fixes))


def write_workdir(config, state: Mapping[str, np.ndarray], out: str) -> float:
  """A workdir at `out` holding their weights as step 0's checkpoint; returns the model's
  validation accuracy (the checkpoint's metric)."""
  check_config(config, state)
  run_checks.check_new_workdir(out)
  return train.write_params_workdir(config, out, to_params(state), 0,
                                    'paraformer_jax.authors_weights')


def define_flags():
  """Only when run as a program: importing this module defines no flags."""
  config_flags.DEFINE_config_file('config', None, 'Config the weights are for (reference '
                                  'style, cls pooling, their sizes).', lock_config=True)
  flags.DEFINE_string('weights', None, "The authors' saved state_dict (.t7/.pt/.pth, needs "
                      'torch) or an .npz of its arrays.')
  flags.DEFINE_string('out', None, 'Workdir to write (must not exist).')
  processes.define_flags()
  flags.mark_flags_as_required(['config', 'weights', 'out'])


def main(argv):
  cli.no_positional_arguments(argv)
  cli.setup_logging()
  config, out = cli.config(), flags.FLAGS.out
  processes.start()
  val = write_workdir(config, load_state(flags.FLAGS.weights), out)
  if jax.process_index():
    return  # process 0 prints
  print(f'{out}: their weights, validation accuracy {100 * val:.2f}%. Evaluate with\n'
        f'  python -m paraformer_jax.main --config={out}/config.py --workdir={out} --mode=eval')


if __name__ == '__main__':
  define_flags()
  cli.run(main)
