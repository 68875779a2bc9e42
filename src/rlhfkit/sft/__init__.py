"""Supervised fine-tuning: instruction data (:mod:`.data`), the loss (:mod:`.losses`), the trainer (:mod:`.train`)."""
