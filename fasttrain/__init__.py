"""fasttrain: supervised contrastive learning (CE, SupCon, SupCon-S, SelfCon, SelfCon-M), deep
supervision (DSN, CDS) and self-supervised contrast (SimCLR, SelfCon-SU/-MU, MixCo) with multi-exit
encoders, fed by torchvision, FFCV or DALI loaders under Hugging Face Accelerate."""
__version__ = "0.1.0"
