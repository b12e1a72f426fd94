"""fasttrain: supervised contrastive learning (CE, SupCon, SupCon-S, SelfCon, SelfCon-M) and deep
supervision (DSN, CDS) with multi-exit encoders, fed by torchvision, FFCV or DALI loaders under
Hugging Face Accelerate."""
__version__ = "0.1.0"
