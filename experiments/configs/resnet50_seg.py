"""ResNet50-Seg: the authors' recipe (spec §3, §9.2: batch 64, pooled Dice, Adam 3e-4; test batch
unknown -> 16, logits >= 0.5).

  python -m experiments.run --config=resnet50_seg [--config.data.dir=PATH/kaggle_3m]
"""
from experiments.configs import base


def get_config(arg=None):
  c = base.base_config(
      'resnet50_seg', batch_size=64, eval_batch_size=16, loss='dice_pooled', optimizer='adam',
      learning_rate=0.0003, weight_decay=0.0, threshold='logit')
  return base.with_arg(c, arg)
