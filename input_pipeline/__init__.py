"""Input pipelines: ArrayRecord example format, grain training iterator, synthetic and MNIST data.

    records.py       the on-disk format (write_shards, RecordSource, dataset_info.json)
    pipeline.py      default_data_config, element_spec, create_train_iterator (checkpointable)
    synthetic.py     deterministic synthetic source with the same element spec
    mnist.py         pixel shards of the embedded digits (the demo's dataset)
    mnist_digits.py  the embedded digits and their fixed train / held-out split

Kept import-free so that `input_pipeline.mnist_digits` stays cheap to import.
"""
