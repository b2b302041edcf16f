"""Training: LoRA fine-tuning (glmvision finetune)."""
