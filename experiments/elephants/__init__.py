"""EWC and WVA "for elephants": keep a pretrained language model's skills while fine-tuning it.

A small decoder-only transformer (Flax NNX, byte vocabulary) is pretrained on
English prose (domain A) and fine-tuned on Python source (domain B) with plain
Adam, EWC, WVA (Fisher, MAS, SIG importance) and implicit EWC; the scenario
measures forgetting (perplexity on held-out A) against learning (perplexity on
held-out B). ``memory`` measures what each method's train step holds,
``sharding`` runs it FSDP-style on several devices, ``scale`` times importance
for a 100M-parameter model. CLI: ``python -m experiments.elephants``.
"""
