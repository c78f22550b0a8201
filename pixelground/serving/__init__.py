"""The web demo behind `python -m pixelground.serve`: a request batcher (`batcher`), the model side that
turns batches into `Predictor` calls (`engine`), pictures and coloured text (`render`) and the Gradio
app (`app`)."""
