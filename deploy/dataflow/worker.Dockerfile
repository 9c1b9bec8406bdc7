# Dataflow worker (SDK container) image for bms (docs/dataflow.md). Build it from the repository
# root and pass it to the job as --sdk_container_image:
#   docker build -f deploy/dataflow/worker.Dockerfile --build-arg BMS_SECRETS="..." -t WORKER_IMAGE .
# Why a custom image: the default Dataflow image has neither the azure/synapse extras (the staged
# sdist installs bms without extras) nor Microsoft's ODBC driver, and Dataflow cannot set
# environment variables on workers, which is where the pipeline reads its secrets from.
# A job that forgets --sdk_container_image runs on Dataflow's default image, which has neither
# pyodbc nor the ODBC driver: the Synapse writer then fails on its first batch, naming this file.
FROM apache/beam_python3.11_sdk:2.77.0

# Microsoft ODBC Driver 18 for SQL Server and unixODBC, for the Synapse writer. Microsoft's apt
# source is per Debian release, and is pinned here rather than read from the base image: a new
# Beam image on another Debian release fails this build with the line below, instead of quietly
# installing packages built for a release Microsoft may not publish (yet). To move on, check
# https://packages.microsoft.com/config/debian/ and build with --build-arg MSODBC_DEBIAN=N.
ARG MSODBC_DEBIAN=12
RUN . /etc/os-release \
    && if [ "$ID" != debian ] || [ "$VERSION_ID" != "$MSODBC_DEBIAN" ]; then \
         echo "the base image is $ID $VERSION_ID, Microsoft's apt source is pinned to Debian" \
              "$MSODBC_DEBIAN: pass --build-arg MSODBC_DEBIAN=$VERSION_ID if Microsoft publishes" \
              "https://packages.microsoft.com/config/debian/$VERSION_ID/prod.list" >&2; \
         exit 1; \
       fi \
    && apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl gnupg \
    && curl -fsSL https://packages.microsoft.com/keys/microsoft.asc \
       | gpg --dearmor -o /usr/share/keyrings/microsoft-prod.gpg \
    && curl -fsSL "https://packages.microsoft.com/config/debian/${MSODBC_DEBIAN}/prod.list" \
       > /etc/apt/sources.list.d/mssql-release.list \
    && apt-get update \
    && ACCEPT_EULA=Y apt-get install -y --no-install-recommends msodbcsql18 unixodbc \
    && odbcinst -q -d -n "ODBC Driver 18 for SQL Server" \
    && rm -rf /var/lib/apt/lists/*

# Only the dependencies stay: the package itself comes from the sdist of setup.py that every job
# stages (--setup_file), so workers always run the code that built the graph. The sources are
# removed too, so that no stale copy can shadow the staged package on sys.path.
COPY setup.py /tmp/bms/
COPY pipeline/ /tmp/bms/pipeline/
COPY producers/ /tmp/bms/producers/
RUN pip install --no-cache-dir "/tmp/bms[azure,synapse]" google-cloud-secret-manager \
    && pip uninstall -y bms-streaming \
    && rm -rf /tmp/bms

# Names of Secret Manager versions to load into the environment (never the secrets themselves):
# "EVENTHUB_CONNECTION_STRING=projects/P/secrets/S/versions/latest SYNAPSE_PASSWORD=...".
ARG BMS_SECRETS=""
ENV BMS_SECRETS=${BMS_SECRETS}
# Marks this image: what a launcher-side check can look for (see docs/synapse.md).
ENV BMS_WORKER_IMAGE=1
COPY deploy/dataflow/worker_entrypoint.py /opt/bms/worker_entrypoint.py
ENTRYPOINT ["python", "/opt/bms/worker_entrypoint.py"]
