"""Evaluation: metrics, retrieval, checkpoint selection, translation of new videos.

- `metrics`     BLEU / chrF (sacrebleu), ROUGE-L, decoding a loader
- `evaluation`  a split decoded across ranks and reported; checkpoint selection by dev BLEU-4
- `retrieval`   embedding passes over a split, retrieval recall, loading a run's model
- `translate`   `sclslt translate`: a trained run on new sign videos or frame folders
"""
