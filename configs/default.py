"""Defaults: the paper's CIFAR-10 setting (ParaFormer 8x2, D=192, 224 px, patch 16, LPA).

Other configs import this and override a few fields. Run it as:
  python -m paraformer_jax.main --config=configs/default.py --workdir=/tmp/pf_cifar10
"""
import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.seed = 0  # parameters, dropout and data order all derive from it
  config.init_from = ''  # workdir of a trained run to start from (fine-tuning); '': none
  # Expansion (continual learning): workdir of a trained run whose embedding, branches and
  # head rows are kept frozen; model.num_branches fresh branches (and new classes' head rows)
  # are trained beside them on this config's data. '': none. See paraformer_jax/expand.py.
  config.expand_from = ''
  # With expand_from: training examples kept per old class and replayed beside the new
  # classes' (0: none), and whether to align the new head rows' norms to the old ones' after
  # training. See paraformer_jax/replay.py.
  config.replay_per_class = 0
  config.align_head = False

  config.data = data = ml_collections.ConfigDict()
  data.name = 'cifar10'  # a TFDS dataset name
  data.data_dir = ''  # TFDS data_dir; '': $TFDS_DATA_DIR or ~/tensorflow_datasets
  data.train_split = 'train[:90%]'  # the authors hold out 10% of train for validation
  data.val_split = 'train[90%:]'  # picks the best checkpoint
  data.test_split = 'test'  # reported at the end and by --mode=eval
  data.num_classes = 10  # classes of the label feature
  data.classes = ''  # keep only these labels, e.g. '0-4' or '1,3,5'; '': all
  data.image_size = 224  # images are resized to image_size x image_size
  # Train crop: 'pad' (the authors' CIFAR recipe: RandAugment on the stored image, resize,
  # random crop after zero padding, flip) or 'inception' (ImageNet: random-resized crop of
  # crop_scale of the area and crop_ratio aspect, flip, then RandAugment).
  data.train_crop = 'pad'
  data.crop_padding = 4  # 'pad': zero padding of the random crop (0: off)
  data.crop_scale = (0.08, 1.0)  # 'inception': area fraction range
  data.crop_ratio = (3 / 4, 4 / 3)  # 'inception': aspect ratio (w / h) range
  data.flip = True  # train: random horizontal flip
  data.randaugment = 'authors'  # their randomaug.py; or 'big_vision' (randaugment.py)
  data.randaugment_layers = 2  # train: RandAugment N (0: off)
  data.randaugment_magnitude = 14  # train: RandAugment M, on the op set's scale (authors: 0..30)
  data.mixup = 0.0  # train: mixup's Beta(a, a) parameter a (0: off); labels become soft
  data.cutmix = 0.0  # train: CutMix's Beta(a, a) parameter (0: off); both on: 50/50 per pair
  # Eval: 'resize' (squash the whole image) or 'center' (shorter side to
  # image_size / eval_crop_fraction, then the central image_size square).
  data.eval_crop = 'resize'
  data.eval_crop_fraction = 0.875
  data.mean = 0.5  # normalization: (x / 255 - mean) / std
  data.std = 0.2
  # Images that do not decode are skipped with a warning; more than this fraction stops.
  data.max_corrupt_fraction = 0.001

  config.model = model = ml_collections.ConfigDict()
  model.patch_size = 16  # image_size must be a multiple of it
  model.width = 192  # D, the token width
  model.num_heads = 3  # heads of width 64
  model.mlp_dim = 768  # hidden width of the MLP
  model.num_branches = 8  # L, parallel branches (1 with branch_depth=N: a sequential ViT)
  model.branch_depth = 2  # M, blocks per branch
  model.dropout = 0.1  # embedding, attention-output and MLP dropout
  model.block_style = 'reference'  # 'prenorm' (x + f(LN x)) or 'reference' (f(LN x) + LN x)
  model.pool = 'cls'  # 'cls' token or 'mean' over tokens
  model.posemb = 'learned'  # or 'sincos2d': big_vision's fixed 2-D sin-cos (width % 4 == 0)
  model.pre_logits = False  # big_vision's pre-logits layer, Dense(width) + tanh, in the head
  model.head_zero_init = False  # the head's last layer starts at zero (big_vision)
  # Initial values: 'torch' (the authors': nn.Linear's U(+-1/sqrt(fan_in)), cls and positions
  # N(0, 1)), 'jax' (Flax's defaults), 'auto' (torch in reference style, else jax).
  model.param_init = 'auto'
  model.dtype = 'float32'  # computation dtype ('bfloat16' for mixed precision); params f32
  # How a device runs its branches: 'auto' (picks by backend and batch), 'vmap', 'scan',
  # 'unrolled' or 'fused'; all give the same result (docs/benchmarks.md, "Branch strategies").
  model.branch_strategy = 'auto'

  config.mesh = mesh = ml_collections.ConfigDict()
  mesh.data = -1  # data-parallel axis size (-1: all devices left after 'branch')
  mesh.branch = 1  # branch axis size; must divide num_branches (and branches_per_stage)

  config.training = training = ml_collections.ConfigDict()
  training.mode = 'lpa'  # 'lpa', 'lpa_fused', 'stagewise' or 'joint' (see steps.py)
  training.epochs = 300  # epochs (per stage when stagewise); an lpa epoch is two passes
  training.batch_size = 500  # global batch, split over processes and the 'data' axis
  training.optimizer = 'adam'  # 'adam', 'adamw' or 'adam_kernel_decay' (optim.make_tx)
  training.learning_rate = 1e-4  # peak learning rate
  training.schedule = 'constant'  # 'constant' or 'cosine' (with linear warmup)
  training.warmup_epochs = 0.0  # cosine only
  training.weight_decay = 0.0  # adamw, adam_kernel_decay only
  training.label_smoothing = 0.0  # targets mixed with the uniform distribution
  training.clip_norm = 1.0  # global-norm clipping of the lpa prefix updates (the authors')
  training.grad_clip_norm = 0.0  # global-norm clipping of every update, any mode (0: off)
  training.branches_per_stage = 1  # stagewise: branches added (and trained) per stage
  training.train_embed_in_later_stages = False  # stagewise: keep training the embedding?
  training.train_head_in_later_stages = True  # stagewise: keep training the head?

  config.eval_batch_size = 500  # padded and masked: every example counts once
  config.eval_every_steps = 0  # validate + checkpoint this often (0: every epoch)
  config.log_every_steps = 50  # progress line and metrics this often
  config.keep_checkpoints = 3  # the last N are kept, plus the best by validation accuracy
  # Also save between validations, at the first log step this long after the last save
  # (0: off): what a kill without warning (a lost host) can cost.
  config.checkpoint_every_minutes = 30.0
  # (first step, count): a jax.profiler trace of those steps in workdir/profile; () for none.
  config.profile_steps = ()
  # grain worker processes preparing batches (0: one thread in the trainer's process).
  config.workers = 4
  return config
