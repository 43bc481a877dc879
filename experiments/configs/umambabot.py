"""UMambaBot: the authors' recipe (spec §5, §9.2: batch 32, pooled Dice, Adam 3e-4; tested with
batch 16, logits >= 0.5).

  python -m experiments.run --config=umambabot [--config.data.dir=PATH/kaggle_3m]
"""
from experiments.configs import base


def get_config(arg=None):
  c = base.base_config(
      'umambabot', batch_size=32, eval_batch_size=16, loss='dice_pooled', optimizer='adam',
      learning_rate=0.0003, weight_decay=0.0, threshold='logit')
  return base.with_arg(c, arg)
