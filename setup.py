from setuptools import setup

# Installs the dependencies only. The code stays in the repository and is imported from its root, which is on
# sys.path exactly when the project runs: `python train.py` / `python eval.py` (the script's folder),
# `python -m scripts.NAME` (the working directory) and pytest (`pythonpath = .` in pytest.ini). Installing the
# folders themselves would put generic top-level names (datasets, utils, network, loss, transforms, train, eval)
# on every path of the environment, where `datasets` would shadow Hugging Face's package.
setup(
    name="hmsa",
    version="0.1.0",
    description="Hierarchical Multi-Scale Attention for semantic segmentation: training and evaluation framework",
    python_requires=">=3.10",
    packages=[],
    py_modules=[],
    install_requires=[
        "torch>=2.1",
        "torchvision",
        "timm>=0.9",
        "numpy",
        "opencv-python-headless",
        "pyyaml",
        "tensorboard",
        "scipy",
        "pillow",
    ],
    extras_require={
        "test": ["pytest>=9", "pytest-timeout", "onnx", "onnxruntime", "onnxscript"],
        "export": ["onnx", "onnxruntime", "onnxscript"],
    },
)
