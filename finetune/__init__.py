"""Fine-tuning recipes for ChatGLM2 model folders: P-Tuning v2 and LoRA through transformers' Trainer.

`python -m finetune` trains (see finetune/README.md), `python -m finetune.evaluate` generates on a
held-out file and scores BLEU-4 and ROUGE-1/2/L.
"""
