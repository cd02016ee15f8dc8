"""ImageNet-1k at 224 px on a TPU pod: ViT-S-width branches, AdamW, warmup + cosine.

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
  # ViT baselines"): inception crop, flip, randaug(2, 10) (10 is its maximum: 30 on our
  # 0..30 scale), mixup 0.2, values in [-1, 1]; eval: shorter side to 256, central 224.
  # DeiT instead: magnitude 27 (its m9 of 10), mixup 0.8 + cutmix 1.0, label smoothing 0.1.
  config.data.train_crop = 'inception'
  config.data.crop_padding = 0
  config.data.randaugment_layers = 2
  config.data.randaugment_magnitude = 30
  config.data.mixup = 0.2
  config.data.eval_crop = 'center'
  config.data.mean = 0.5
  config.data.std = 0.5
  config.model.width = 384  # ViT-S width: 6 heads of 64
  config.model.num_heads = 6
  config.model.mlp_dim = 1536
  config.model.block_style = 'prenorm'
  config.model.dtype = 'bfloat16'
  config.mesh.branch = 2
  config.training.mode = 'lpa_fused'
  config.training.epochs = 300
  config.training.batch_size = 1024
  config.training.optimizer = 'adamw'
  config.training.learning_rate = 1e-3
  config.training.schedule = 'cosine'
  config.training.warmup_epochs = 10
  config.training.weight_decay = 0.05
  config.eval_batch_size = 1024
  config.eval_every_steps = 5000
  config.log_every_steps = 100
  config.workers = 48  # per host: ~21 (v5e) or ~29 (v4) at our 2-core VM's per-core rate, plus
  # headroom for slower host cores (docs/input_pipeline.md)
  return config
