"""`tomectl train`: fit a learned reduction (DTEM, PatchMerger, LTM) on a frozen ViT.

Users have a pretrained ViT and a folder of their own images, often without labels, so the loss is
distillation from the unreduced model (the same backbone with the reduction switched off, or a
frozen copy of it with `finetune`):

    loss = KL(unreduced || reduced logits) + feature_weight * MSE(pre-logits features)
           + ce_weight * CE(labels)   (only where the images have labels)
           + the method's own `aux_loss` (LTM's information-bottleneck bound)

Only the method's modules learn (`model.tomectl_modules`); the backbone stays frozen and in eval
mode, unless `finetune`. timm's training augmentation, AdamW (timm's optimizer factory: no weight
decay on biases and norms), a per-step cosine schedule with warm-up, gradient clipping.

Runs on CPU, one GPU, or several through ``torchrun`` (PyTorch DDP; gloo on CPU, nccl on GPU):
the same command. Each process takes its share of every epoch's shuffled order.

Checkpoints: ``OUT.ckpt`` is written (atomically) after every epoch and when the run is
interrupted (Ctrl-C), with the position inside the epoch; `resume` continues from it exactly (the
order of an epoch depends only on the seed and the epoch). When training ends the artifact
directory OUT is written atomically (recipe.yaml with `learned: learned.safetensors`, summary.json,
learned.safetensors, train.json, and model.safetensors after `finetune`) and the checkpoint removed.

The rooms: `config` (what a run takes and returns), `dist` (processes and each one's share of an
epoch), `loss` (the distillation loss), `trainer` (`Trainer`: setup, resume, epoch, validation,
checkpoints, the artifact through the writer `compress` uses; `train` runs one).
"""

from .config import AUGMENTS, EpochLog, TrainConfig, TrainResult
from .dist import Dist, epoch_indices, init_distributed
from .loss import distillation_loss
from .trainer import Trainer, TrainingInterrupted, checkpoint_path, default_schedule, train

__all__ = ["AUGMENTS", "Dist", "EpochLog", "TrainConfig", "TrainResult", "Trainer", "TrainingInterrupted",
           "checkpoint_path", "default_schedule", "distillation_loss", "epoch_indices", "init_distributed",
           "train"]
