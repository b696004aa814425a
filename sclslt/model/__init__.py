"""The model and what it is trained against.

- `slt`      frames -> visual encoder -> contrastive head and mBART decoder (`SLTModel`)
- `augment`  clip augmentation on the device (each clip's uniforms drawn in the loader)
- `batchnorm` BatchNorm over the set `model.batchnorm` names (global batch, groups of clips, frozen), valid steps only
- `masks`    4-D attention masks made without reading the device
- `heads`    similarity heads (pooled, CiCo): features, gathered columns, loss, evaluation scores; registered by name
- `losses`   symmetric InfoNCE over negatives gathered from all ranks (kernels in `sclslt_kernels`), CE
"""
