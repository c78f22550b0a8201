"""pixelground: pixel-grounded vision-language models (PixelLLM, LISA, GELLA) in JAX/Flax NNX."""

import setuptools

JAX_VERSION = "0.10.2"

INSTALL_REQUIRES = [
    f"jax=={JAX_VERSION}",
    f"jaxlib=={JAX_VERSION}",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.6,<0.3",
    "orbax-checkpoint>=0.12,<0.13",
    "grain>=0.2.12,<0.3",
    # TFDS builds array_record datasets and serves as_data_source() without TensorFlow.
    "tensorflow-datasets>=4.9.9,<5",
    "importlib_resources>=6",
    "array_record>=0.7",
    "ml-collections>=1.0,<2",
    "absl-py>=2.1",
    "sentencepiece>=0.2,<0.3",
    "numpy>=1.26,<3",
    "pillow>=10",
    "safetensors>=0.4,<1",
    "msgpack>=1.0",
    "tensorstore>=0.1.65",
    "tqdm>=4.66",
    # COCO polygon / RLE masks (refcoco, coco instances) — the official rasteriser.
    "pycocotools>=2.0.8",
    # Caption metrics (BLEU / METEOR / ROUGE-L / CIDEr) exactly as the COCO caption evaluation computes
    # them; METEOR and its PTB tokenizer run Java (pixelground.metrics.captions explains the fallback).
    "pycocoevalcap>=1.2",
    # Hungarian matching (trace LBM distance).
    "scipy>=1.11",
    # The trainer's TensorBoard event files (pixelground.training.writers), without TensorFlow.
    "tensorboardX>=2.6,<3",
    # The web demo (python -m pixelground.serve).
    "gradio>=6.31,<7",
    # What the test extras resolve to (tensorboard and Beam need < 7): `make demo` installs the library
    # alone and should run on the protobuf the tests ran.
    "protobuf>=5.29,<7",
]

EXTRAS_REQUIRE = {
    # Deviceless TPU compilation (compile_check) and TPU runs.
    "tpu": [f"jax[tpu]=={JAX_VERSION}"],
    # Distributed dataset preparation (image_text at web scale) on Apache Beam.
    "beam": ["apache-beam>=2.60"],
    "test": [
        "pytest>=8",
        "pytest-xdist>=3.5",
        "hypothesis>=6.100",
        # The CPU wheel (2.13.0+cpu) satisfies this pin; newer torch pulls CUDA packages.
        "torch==2.13.0",
        "transformers>=5.0,<6",
        # The Beam path of the image_text builder is tested with the DirectRunner.
        "apache-beam>=2.60",
        # pixelground.training.writers' event files are checked with TensorBoard's own reader (no TF needed).
        "tensorboard>=2.16",
        # notebooks/: their plots, and tests/test_notebooks.py executes them headless in a kernel.
        "matplotlib>=3.8",
        "nbclient>=0.10",
        "nbformat>=5.10",
        "ipykernel>=6.29",
        # tests/test_serve.py drives the web demo in Debian's chromium (no browser download) and
        # over loopback HTTP.
        "playwright>=1.50",
        "gradio_client>=2.7",
    ],
}

setuptools.setup(
    name="pixelground",
    version="0.1.0",
    description=__doc__,
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["pixelground", "pixelground.*", "tfds_builders", "tfds_builders.*"]),
    # The committed tiny SentencePiece model (pixelground.data.tokenizer.load_tokenizer("tiny")).
    package_data={"pixelground": ["data/vocab/*.model"]},
    include_package_data=True,
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    license="Apache-2.0",
)
