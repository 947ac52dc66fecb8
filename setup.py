"""pip install -e . : the core, training/ and the `segsafe` CLI, without ROS.

On a robot, `colcon build` (CMakeLists.txt) installs the same modules next to the
generated messages; this file serves machines that only train and evaluate.
"""

from setuptools import find_packages, setup

setup(
    name="segmentation_safety",
    version="0.1.0",
    description="Per-pixel anomaly and failure maps for semantic segmentation (ROS 2)",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(
        include=["segmentation_safety", "segmentation_safety.*", "training", "training.*"]
    ),
    install_requires=[
        "torch>=2.1",
        "torchvision>=0.16",
        "numpy",
        "pillow",
        "opencv-python-headless<5",
        "pyyaml",
        "safetensors",
        "scipy",
        "tqdm",
        "matplotlib",
    ],
    extras_require={
        "train": ["tensorboard", "scikit-learn"],
        "bags": ["rosbags"],
        "test": ["pytest", "scikit-learn", "ruff"],
    },
    entry_points={"console_scripts": ["segsafe = segmentation_safety.cli:main"]},
)
