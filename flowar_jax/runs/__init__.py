"""Run I/O on any path, local or `gs://`: the file-system layer every reader and writer of a run goes through."""
