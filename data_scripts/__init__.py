"""Data preparation for the ANN benchmarks: ``python -m data_scripts.prepare --list``.

Downloads (resumable), verifies and converts SIFT1M, GloVe-100, Deep10M and the local real sets in
``../shared/data`` (siftsmall, bigann10k, MNIST, GloVe-6B-50d) to the ann-benchmarks HDF5 layout, read
back with :func:`flashgmm_faiss.io.load_dataset`. See ``data_scripts/README.md``.
"""
