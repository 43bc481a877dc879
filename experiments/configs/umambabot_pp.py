"""UMambaBot-PP: the authors' recipe (spec §6, §9.2: batch 64, pooled Dice, Adam 3e-4; tested with
batch 16, logits >= 0.5).

  python -m experiments.run --config=umambabot_pp [--config.data.dir=PATH/kaggle_3m]
"""
from experiments.configs import base


def get_config(arg=None):
  c = base.base_config(
      'umambabot_pp', batch_size=64, eval_batch_size=16, loss='dice_pooled', optimizer='adam',
      learning_rate=0.0003, weight_decay=0.0, threshold='logit')
  return base.with_arg(c, arg)
