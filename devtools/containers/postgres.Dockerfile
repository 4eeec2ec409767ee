# PostgreSQL 15 from Debian, speaking the official postgres image's interface
# (POSTGRES_USER / POSTGRES_PASSWORD / POSTGRES_DB, port 5432, password auth over TCP).
ARG BASE
FROM ${BASE}
# Debian would create a "main" cluster on install; the entrypoint makes its own at start.
RUN apt-get update -q \
 && apt-get install -y -q --no-install-recommends postgresql-common \
 && sed -i 's/^#\?create_main_cluster.*/create_main_cluster = false/' \
        /etc/postgresql-common/createcluster.conf \
 && apt-get install -y -q --no-install-recommends postgresql-15 \
 && rm -rf /var/lib/apt/lists/* \
 && install -d -o postgres -g postgres -m 700 /var/lib/postgresql/data
COPY postgres-entrypoint.sh /usr/local/bin/
USER postgres
EXPOSE 5432
ENTRYPOINT ["/usr/local/bin/postgres-entrypoint.sh"]
CMD ["postgres"]
