"""Knowledge distillation: a smaller student trained on the teacher's logits."""
