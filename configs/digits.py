"""The embedded default: scikit-learn's handwritten digits (1,797 real 8x8 images), offline.

Trains a ParaFormer 8x1 with fused progressive approximation on 2 CPU cores in about a
minute, then prints the test accuracy of every prefix of branches k = 1..8:
  python -m paraformer_jax.main --config=configs/digits.py --workdir=/tmp/pf_digits
  python -m paraformer_jax.main --config=configs/digits.py --workdir=/tmp/pf_digits --mode=eval
"""
from configs import default


def get_config():
  config = default.get_config()
  config.data.name = 'sklearn_digits'  # built from scikit-learn's copy, no download
  config.data.train_split = 'train'  # 1,257 images
  config.data.val_split = 'validation'  # 180
  config.data.test_split = 'test'  # 360
  config.data.image_size = 8
  config.data.crop_padding = 0  # a 1-pixel shift of an 8x8 digit cost accuracy: 84% vs 96%
  config.data.flip = False  # digits are not mirror-symmetric
  config.data.randaugment_layers = 0
  config.data.mean = 0.3
  config.data.std = 0.4
  config.model.patch_size = 2  # 16 patches + cls
  config.model.width = 64
  config.model.num_heads = 1
  config.model.mlp_dim = 128
  config.model.num_branches = 8
  config.model.branch_depth = 1
  config.model.dropout = 0.0
  config.model.block_style = 'prenorm'
  config.training.mode = 'lpa_fused'
  config.training.epochs = 40
  config.training.batch_size = 64
  config.training.learning_rate = 1e-3
  config.eval_batch_size = 128
  config.eval_every_steps = 95  # every 5 epochs of 19 steps
  config.log_every_steps = 95
  config.workers = 0  # 8x8 images: starting processes costs more than it saves
  return config
