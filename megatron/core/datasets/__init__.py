"""Datasets: GPTDataset and its indices, mock documents, splits, samplers."""
