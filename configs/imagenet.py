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
  config.data.crop_padding = 0
  config.data.randaugment_magnitude = 9
  config.data.mean = 0.45
  config.data.std = 0.25
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
  config.workers = 16
  return config
