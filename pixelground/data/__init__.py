"""Input pipelines: tokenizer, transforms, task converters, Grain loaders."""
