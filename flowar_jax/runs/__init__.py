"""Run I/O on any path, local or `gs://`: the file-system layer (fs), checkpoints, the workdir layout, the stored
config, loaders of trained weights, metrics and sample images. Training, sampling, evaluation and conversion
all read and write runs through it; it imports nothing of theirs."""
