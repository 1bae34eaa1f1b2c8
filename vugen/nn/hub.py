"""Model-card metadata every vugen module saved with huggingface_hub's `PyTorchModelHubMixin` carries."""

HUB_METADATA = {"library_name": "vugen", "license": "apache-2.0", "paper_url": "https://arxiv.org/abs/2510.06529"}
HUB_TAGS = ["vugen", "image-generation"]
