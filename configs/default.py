"""Shared defaults for every bnfree_jax recipe.

Recipes import this file, call get_config() and change a few fields. Every key
below is read by the trainer or the report tool. The config comes back
locked: a key that is not here is an error, whether a recipe sets it or a
--config.* override does, so a typo cannot go unnoticed. A new key belongs
here, with a comment.
"""

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()

  # Data: see bnfree_jax/input_pipeline.py for the allowed datasets.
  c.dataset = 'imagenet2012'
  c.data_dir = ''           # '' -> the tfds default (~/tensorflow_datasets).
  c.image_size = -1         # -1 -> the dataset's own (224 for imagenet2012).
  c.batch_size = 256        # Global, over all devices of all processes.
  c.eval_batch_size = -1    # -1 -> batch_size.
  c.shuffle_buffer = 16_384
  # > 0: train on the first this many training examples as stored (datasets
  # held in memory only); -1: all. Epochs, and so the schedules, follow it.
  c.train_subset = -1
  c.synthetic = ml_collections.ConfigDict(dict(
      image_size=32, channels=3, num_classes=10, num_train=1024, num_eval=256))

  # Length: num_train_steps wins over num_epochs when > 0.
  c.num_epochs = 90
  c.num_train_steps = -1

  c.model = ml_collections.ConfigDict(dict(
      name='resnet18',      # resnet10|18|34|50|101|152, nf_resnet18|26|34|50|101, or linear
                            # (a Dense layer on the scattering: norm='none', stem='scatter'
                            # or 'scatter12')
      # batch | weight | group | group_ws (weight-standardized convs + GroupNorm) | none;
      # nf_*: scaled_ws (their only one)
      norm='batch',
      width=64,
      dropout_rate=0.0,
      # Dropout before the classifier (resnet*); -1 -> dropout_rate, as in the blocks.
      head_dropout_rate=-1.0,
      drop_path_rate=0.0,   # nf_* only: stochastic depth, rising linearly to this over the blocks.
      stem='imagenet',      # imagenet | small (3x3 stride 1, no pool) | small_s2 (3x3 stride 2)
                            # | scatter (3x3 on the fixed J=2 scattering: models/scattering.py)
                            # | scatter12 (linear only: the J=2 and J=1 scatterings)
      wn_data_init=False,   # Salimans & Kingma data-dependent init of WNConv.
      # norm='batch': 'global' statistics over the whole batch (synced BN), or
      # 'per_device' over each device's shard, as PyTorch DataParallel/DDP.
      bn_stats='global',
      # norm='group(_ws)': GroupNorm with gcd(gn_groups, width) groups in every layer.
      gn_groups=16,
  ))

  c.optimizer = ml_collections.ConfigDict(dict(
      momentum=0.9,
      nesterov=False,
      weight_decay=1e-4,
      # 'kernels': conv/dense kernels and WN directions v only; 'all': every
      # parameter (g, biases, BN scale/bias too), as PyTorch's
      # SGD(model.parameters(), weight_decay=...).
      weight_decay_on='kernels',
      momentum_correction=True,  # Goyal et al. 2017, sec. 2.1.
  ))

  c.lr_schedule = ml_collections.ConfigDict(dict(
      name='linear',        # constant|linear|exponential|step|cyclic|cosine
      base_lr=0.1,          # Peak LR, reached after the warm-up.
      warmup_epochs=0.0,    # Linear warm-up from warmup_init_lr to base_lr.
      warmup_init_lr=0.0,
      hold_epochs=0.0,      # base_lr held this long after the warm-up, then
                            # the named schedule over the remaining steps.
      staircase_epochs=0.0,  # > 0: the schedule after warm-up and hold changes
                             # only every this many epochs; 0: every step.
      end_lr=0.0,           # linear, cosine: value at the last step.
      decay_rate=0.94,      # exponential: factor per epoch.
      step_epochs=(30, 60, 80),  # step: epochs at which the LR is multiplied
      step_factor=0.1,           #       by step_factor.
      min_lr=1e-4,          # cyclic: triangle between min_lr and base_lr,
      cycle_epochs=4.0,     #         half a cycle lasting cycle_epochs.
  ))

  c.grad_clip = ml_collections.ConfigDict(dict(
      # none | constant | log | log_curve | agc. Per epoch from threshold to
      # final_threshold: log by a constant factor, log_curve along
      # threshold + a ln(1 + epoch) (bnfree_jax/optim.py).
      mode='none',
      threshold=5.0,        # constant: the threshold; log*: the first epoch's.
      final_threshold=1.0,  # log*: the last epoch's threshold.
      agc_clipping=0.01,    # agc: unit-wise ratio |g|/|w| (Brock et al. 2021).
      agc_eps=1e-3,
  ))

  # Differentially private training (DP-SGD, Abadi et al. 2016; README's
  # "Differential privacy"). With enabled=True each step sees a Poisson sample
  # of the training set of expected size batch_size; each example's gradient
  # is clipped to L2 norm l2_clip, the clipped gradients summed, one Gaussian
  # draw of std noise_multiplier * l2_clip added and the sum divided by
  # batch_size; then the optimizer above. Needs an in-memory dataset and a
  # norm that keeps examples apart (not 'batch').
  c.dp = ml_collections.ConfigDict(dict(
      enabled=False,
      l2_clip=1.0,
      # Exactly one of these two: the noise multiplier sigma, or the epsilon
      # (at delta, after the planned steps) that sigma is calibrated to.
      noise_multiplier=-1.0,
      target_epsilon=-1.0,
      delta=1e-5,
      accountant='pld',        # pld | rdp: computes the logged train/epsilon.
      # poisson: what the accountant assumes. shuffle: fixed-size batches of a
      # shuffled epoch, for comparison only: its epsilon assumes Poisson.
      sampling='poisson',
      microbatch_size=256,     # Examples per vmapped chunk (global): bounds memory.
      # > 0: each example's gradient is the mean over this many random
      # pad-crop-flip copies, before clipping (De et al. 2022); 0: as stored.
      augmult=0,
      # > 0 (model.name='linear' only): before training, release the mean of
      # the training set's features by the Gaussian mechanism with this noise
      # multiplier, and center the features on it; its privacy cost is
      # composed into the epsilon (and the calibration of noise_multiplier).
      # -1: off.
      feature_mean_noise=-1.0,
  ))

  c.seed = 0
  c.label_smoothing = 0.0        # Training loss only; eval loss is plain cross-entropy.
  # Exponential moving average of the parameters (and BN statistics), updated
  # every step and evaluated as eval_ema/*; 0 -> off. ema_warmup: the decay
  # is min(ema_decay, (1 + t) / (10 + t)) at step t, as TF's and timm's.
  c.ema_decay = 0.0
  c.ema_warmup = True
  # Fine-tuning: a workdir (its newest checkpoint) or a checkpoint directory
  # (WORKDIR/checkpoints/STEP) whose parameters and BN statistics a fresh run
  # starts from; a head of another class count is initialised anew. Ignored
  # once the run has checkpoints of its own.
  c.init_from = ''
  c.log_every_steps = 100
  c.histogram_every_steps = 500  # Gradient-magnitude histograms (paper Fig. 3).
  # One layer's histogram too, as Fig. 3 shows "the ninth layer": ResNet-18's
  # ninth weight layer (stem 1, stage1 2-5, stage2 6-9); '' -> none.
  c.histogram_layer = 'stage2_block1/conv2'
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.eval_every_steps = -1        # -1 -> once per epoch.
  c.eval_only = False
  c.on_nonfinite = 'stop'        # stop | skip
  # A run can diverge without a non-finite step, its loss back at chance:
  # 'stop' saves, says in one line what it saw and exits with code 3, as
  # on_nonfinite='stop' does; 'ignore' trains on. It has diverged after
  # `patience` consecutive log intervals, past the LR warm-up, whose train
  # loss is at or above chance (ln of the class count), counted once the best
  # logged loss was a fraction chance_drop below chance (a run that has not
  # yet left chance is slow, not diverged), or above loss_factor times the
  # best logged loss. The rule in full: bnfree_jax/train.py, DivergenceWatch.
  c.on_divergence = 'stop'       # stop | ignore
  c.divergence = ml_collections.ConfigDict(dict(
      patience=5,
      loss_factor=4.0,
      chance_drop=0.1,
  ))
  c.remat = False                # jax.checkpoint around each residual block.
  c.compute_dtype = 'float32'    # float32 | bfloat16 (params stay float32).

  c.paper = None  # configs/paper/: the paper's numbers for the row, for the report.
  c.lock()
  return c
