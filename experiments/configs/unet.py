"""UNet: the authors' recipe (spec models-conv-umamba.md §2, §9.2: batch 64, pooled Dice (smooth
100), Adam 3e-4; tested with batch 64, logits >= 0.5).

  python -m experiments.run --config=unet [--config.data.dir=PATH/kaggle_3m]
"""
from experiments.configs import base


def get_config(arg=None):
  c = base.base_config(
      'unet', batch_size=64, eval_batch_size=64, loss='dice_pooled', optimizer='adam',
      learning_rate=0.0003, weight_decay=0.0, threshold='logit')
  return base.with_arg(c, arg)
