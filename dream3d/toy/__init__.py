"""The trained toy priors: training the pixel-space UNet (train_unet.py, ``dream3d train-prior``) and
toy-mvdream (train_mvdream.py), and scoring a prior's samples (eval_prior.py, ``dream3d eval-prior``)."""
