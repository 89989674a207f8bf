from setuptools import find_packages, setup

setup(
    name="hmsa",
    version="0.1.0",
    description="Hierarchical Multi-Scale Attention for semantic segmentation: training and evaluation framework",
    python_requires=">=3.10",
    packages=find_packages(include=["network*", "loss*", "datasets*", "transforms*", "utils*"]),
    py_modules=["train", "eval"],
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
        "test": ["pytest>=7", "pytest-timeout", "onnx", "onnxruntime", "onnxscript"],
        "export": ["onnx", "onnxruntime", "onnxscript"],
    },
)
