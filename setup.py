"""Packaging for bms: a portable Apache Beam alternative to the BookMyShow ASA job.

Kept as setup.py (not only pyproject) because Dataflow's --setup_file stages it with the job.
"""

from setuptools import find_packages, setup

setup(
    name="bms-streaming",
    version="0.1.0",
    description="BookMyShow booking/payment streaming join on Apache Beam, ASA-compatible",
    python_requires=">=3.11",
    packages=find_packages(include=["pipeline", "pipeline.*", "producers", "producers.*"]),
    install_requires=[
        "apache-beam==2.77.0",
        "orjson>=3.9",
        "faker>=30",
        "sqlalchemy>=2.0",
        "sqlglot>=25",
        "duckdb>=1.1",
        "tenacity>=8.2",
        "prometheus-client>=0.20",
        "rich>=13",
    ],
    extras_require={
        "azure": [
            "azure-eventhub>=5.11",
            "azure-identity>=1.15",
            "azure-eventhub-checkpointstoreblob>=1.1",
        ],
        "synapse": ["pyodbc>=5.0", "azure-identity>=1.15"],
        "postgres": ["psycopg[binary]>=3.1"],
        "dataflow": ["apache-beam[gcp]==2.77.0"],
        "dev": [
            "pytest>=8",
            "pytest-timeout>=2.3",
            "hypothesis>=6.100",
            "ruff>=0.6",
            "psutil>=5.9",
        ],
    },
    entry_points={"console_scripts": ["bms=pipeline.cli:main"]},
)
