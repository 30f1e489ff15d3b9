"""Every row of the paper's Tables 1-6 (and Fig. 3a) as a config; common.py
says how the paper's unstated details are read, and how the ':small',
':lowdata' and ':tiny' twins are made. A run that appears in several tables
has one file:

  Table 1  ResNet-18 (batch normalized)             t1_bn  (= BN row of Tables 2, 4, 5, 6)
           + constant gradient clipping threshold   t1_constant_clip
           + weight normalization                   t1_wn
  Table 2  adaptive clipping & dropout, LR 0.01     t2_wn_clip_dropout_lr0p01
                                                    (= Table 3 "5", Table 4 monotonic,
                                                       Table 6 ResNet-18 monotonic)
           adaptive clipping, LR 0.01               t2_wn_clip_lr0p01
           adaptive clipping, LR 0.001              t2_wn_clip_lr0p001
  Table 3  initial clip value 10                    t3_clip10
  Table 4  cyclic, LR 0.01                          t4_cyclic_lr0p01
           cyclic, LR 0.001                         t4_cyclic_lr0p001
           step decrease, LR 0.001                  t4_step_lr0p001
  Table 5  warm-up + adaptive momentum              t5_warmup_momentum
                                                    (= Table 6 ResNet-18 warm-up)
  Table 6  ResNet-34 / -50 batch normalized         t6_r34_bn, t6_r50_bn
           non-BN, monotonically decreasing         t6_r34_wn_monotonic, t6_r50_wn_monotonic
           non-BN, warm-up                          t6_r34_wn_warmup, t6_r50_wn_warmup
  Fig. 3a  no normalization at all, LR 1e-5         f3_unnormalized

All of them at small scale, one after another (:lowdata for the 6000-example
twins):
  python -m launch.sweep --workdir runs/paper_small $(ls configs/paper/[tf]*.py | sed 's/$/:small/')
"""
