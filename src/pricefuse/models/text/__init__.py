"""The `text` member: a fine-tuned transformer (encoder or decoder + LoRA)."""
