"""Data: corpus -> shards -> loader.

- `synthetic`  the deterministic synthetic sign language (the default corpus and the test bed)
- `layouts`    readers of the real corpora's own layouts, one module each (PHOENIX-2014T, CSL-Daily, How2Sign,
               captions, manifests), registered in `sclslt.registry.CORPUS_LAYOUTS`
- `decoding`   a clip as files (`Item`), its checks, PIL / PyAV decoding and `even_frames` (sharding and translation)
- `sharding`   `sclslt shard`: a corpus layout's split to shards (`SplitSharder`: write, flush_shard, finish)
- `codec`      on-disk forms of a pre-decoded clip (npy, npy.zst, jpg, mp4)
- `shards`     the WebDataset shard format and its manifest (written by `sclslt shard`, sclslt/data/sharding.py)
- `corpus`     which shards a config trains on: data.shards_dir, or the synthetic corpus made once into a cache
- `loader`     an epoch's global batches (`epoch_order`), each rank's slice of them by random access with
               per-clip draws (`GlobalStream`), evaluation streams, collation (with the valid frames' host layout)
- `prefetch`   batches on the device one step ahead (a thread, a side CUDA stream): the copy overlaps the step
- `devdecode`  jpg frames decoded on the device (nvImageCodec / nvJPEG), threads sized to the rank's cores
- `text`       text normalisation, sentence ids (the false-negative identity), tokenizers
- `vocab`      vocabulary trimming of a pretrained tokenizer and the run's vocabulary record
"""
