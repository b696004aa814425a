"""The model and what it is trained against.

- `slt`      frames -> visual encoder -> contrastive head and mBART decoder (`SLTModel`)
- `augment`  clip augmentation on the device
- `losses`   symmetric InfoNCE over negatives gathered from all ranks (kernels in `sclslt_kernels`), CE
"""
