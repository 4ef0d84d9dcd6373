"""Demo data and a demo base model, written offline: Fashion-MNIST as image folders and a random tiny ViT."""
