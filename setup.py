"""vit_jax: Vision Transformers in JAX/Flax. `requirements.txt` pins the tested versions."""
import pathlib

import setuptools

setuptools.setup(
    name='vit_jax',
    version='0.1.0',
    description='Pre-train and fine-tune Vision Transformers (ViT) in JAX/Flax, CPU to TPU pods.',
    long_description=pathlib.Path('README.md').read_text(encoding='utf-8'),
    long_description_content_type='text/markdown',
    packages=setuptools.find_packages(include=['vit_jax', 'vit_jax.*']),
    python_requires='>=3.11',
    install_requires=[
        'absl-py>=2.0',
        'clu>=0.0.12',
        'einops>=0.7',
        'flax>=0.12,<0.13',
        'importlib_resources',
        'jax>=0.10,<0.11',
        'matplotlib>=3.8',
        'ml_collections>=1.0',
        'numpy>=1.26',
        'optax>=0.2.5',
        'orbax-checkpoint>=0.12,<0.13',
        'pillow>=10',
        'safetensors>=0.4',
        'scikit-image>=0.22',
        'scikit-learn>=1.4',
        'scipy>=1.12',
        'tensorboard>=2.16',
        'tensorflow-datasets>=4.9.6,<5',
        'tensorflow-cpu>=2.16; platform_machine=="x86_64"',
        'tensorflow>=2.16; platform_machine!="x86_64"',
    ],
    extras_require={'test': ['pytest>=8', 'pytest-xdist', 'nbclient', 'nbformat', 'ipykernel']},
)
