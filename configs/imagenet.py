"""ImageNet-1k at 224 px on a TPU pod: big_vision's ViT-S/16 recipe with ParaFormer branches.

  # ImageNet archives in $DATA/downloads/manual, then once:
  tfds build imagenet2012 --data_dir=$DATA --file_format=array_record
  python -m paraformer_jax.main --config=configs/imagenet.py --workdir=gs://BUCKET/pf_in1k \
      --config.data.data_dir=$DATA
The mesh puts 2 branches' worth of devices on 'branch' (8 branches: 4 per device group);
the rest of the devices split the batch.
"""
from configs import default


def get_config():
  config = default.get_config()
  config.data.name = 'imagenet2012'
  config.data.train_split = 'train[:99%]'  # 12,811 held-out train images pick the best step
  config.data.val_split = 'train[99%:]'
  config.data.test_split = 'validation'  # the official 50,000 validation images
  config.data.num_classes = 1000
  # Input: big_vision's ViT-S/16 ImageNet recipe (configs/vit_s16_i1k.py of "Better plain
  # ViT baselines"): inception crop, flip, randaug(2, 10) (its TF ops, levels 0..10), mixup
  # 0.2, values in [-1, 1]; eval: shorter side to 256, central 224.
  config.data.train_crop = 'inception'
  config.data.crop_scale = (0.05, 1.0)  # decode_jpeg_and_inception_crop's area 5..100%
  config.data.crop_ratio = (0.75, 1.33)
  config.data.crop_padding = 0
  config.data.randaugment = 'big_vision'
  config.data.randaugment_layers = 2
  config.data.randaugment_magnitude = 10
  config.data.mixup = 0.2
  config.data.eval_crop = 'center'
  config.data.mean = 0.5
  config.data.std = 0.5
  config.model.width = 384  # ViT-S width: 6 heads of 64
  config.model.num_heads = 6
  config.model.mlp_dim = 1536
  config.model.block_style = 'prenorm'
  # big_vision's vit_s16_i1k model: global average pooling, fixed 2-D sin-cos positions, a
  # pre-logits layer (rep_size=True) and a zero-initialized head.
  config.model.pool = 'mean'
  config.model.posemb = 'sincos2d'
  config.model.pre_logits = True
  config.model.head_zero_init = True
  config.model.dropout = 0.0  # big_vision's ViT has none (the authors' CIFAR models: 0.1)
  config.model.dtype = 'bfloat16'
  config.mesh.branch = 2
  config.training.mode = 'lpa_fused'
  config.training.epochs = 300
  config.training.batch_size = 1024
  # Its optimizer: Adam, lr 1e-3, warmup + cosine, decoupled weight decay 1e-4 on kernels
  # (times the schedule's shape, not the learning rate), gradients clipped at norm 1.
  config.training.optimizer = 'adam_kernel_decay'
  config.training.learning_rate = 1e-3
  config.training.schedule = 'cosine'
  config.training.warmup_epochs = 8.08  # big_vision's 10,000 steps, at 1,238 steps per epoch
  config.training.weight_decay = 1e-4
  config.training.grad_clip_norm = 1.0
  config.eval_batch_size = 1024
  config.eval_every_steps = 5000
  config.log_every_steps = 100
  config.workers = 48  # per host: ~21 (v5e) or ~29 (v4) at our 2-core VM's per-core rate, plus
  # headroom for slower host cores (docs/input_pipeline.md)
  return config
