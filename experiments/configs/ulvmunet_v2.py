"""UltraLight VM-UNet v2: the authors' recipe (spec models-ultralight.md §6: batch 2, BCE +
per-image Dice, AdamW 3e-4 wd 0.01 on every parameter; tested with batch 16, sigmoid >= 0.5).

  python -m experiments.run --config=ulvmunet_v2 [--config.data.dir=PATH/kaggle_3m]
"""
from experiments.configs import base


def get_config(arg=None):
  c = base.base_config(
      'ulvmunet_v2', batch_size=2, eval_batch_size=16, loss='bce_dice', optimizer='adamw',
      learning_rate=0.0003, weight_decay=0.01, threshold='sigmoid')
  return base.with_arg(c, arg)
