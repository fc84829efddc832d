"""The data layer: manifests, sampling, decoding (PyAV and DALI), sample data and transcoding."""
