"""SegFormer: the authors' recipe (spec §4, §9.2, §9.5: batch 16, BCE with logits, AdamW 1e-4 wd
5e-5, trained at 224 and tested at 256, sigmoid >= 0.5).

  python -m experiments.run --config=segformer [--config.data.dir=PATH/kaggle_3m]

The paper's LR-on-plateau and early stopping were never called by the authors; they are off
here and enabled with --config.plateau_patience=N / --config.early_stopping_patience=N.
"""
from experiments.configs import base


def get_config(arg=None):
  c = base.base_config(
      'segformer', batch_size=16, eval_batch_size=16, loss='bce', optimizer='adamw',
      learning_rate=0.0001, weight_decay=5e-05, threshold='sigmoid', train_image_size=224)
  # Synthetic images are 128 px: train below the test size as at 224/256, on a multiple of 32
  # (the decoder's x8 upsampling of the 1/32 stage must land on the 1/4 grid).
  c.synthetic_run.train_image_size = 96
  return base.with_arg(c, arg)
