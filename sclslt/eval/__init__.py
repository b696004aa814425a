"""Evaluation: metrics, retrieval, checkpoint selection, translation of new videos.

- `metrics`     BLEU / chrF (sacrebleu), ROUGE-L, decoding a loader
- `evaluation`  a split decoded across ranks and reported; checkpoint selection by dev BLEU-4
- `retrieval`   embedding passes over a split, retrieval recall, loading a run's model
- `translate`   `sclslt translate`: a trained run or an exported model on new sign videos or frame folders
- `hub`         `SignTranslator`: an exported model loaded by path or Hugging Face Hub name
- `export`      `sclslt export`: a run's selected checkpoint as a Hugging Face model folder
- `card`        the export's model card (Hub metadata with model-index, and its prose)
- `demo`        `sclslt demo`: a Gradio page to try a run or an exported model
"""
