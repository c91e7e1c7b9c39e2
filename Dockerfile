# Multi-stage build: compile in the Rust image, run from a slim Debian with only the binary.
# Build:   docker build -t segmentd .
# Daemon:  docker run --rm -v "$PWD/segmentd.toml:/etc/segmentd/segmentd.toml:ro" \
#            -v "$PWD/data:/data" -p 9464:9464 segmentd
#          (the default command is `segmentd run` with the mounted config; in it set
#          daemon.snapshot and store.path under /data, and http.listen = "0.0.0.0:9464")
# Batch:   docker run --rm -v "$PWD/data:/data" segmentd discover --orders /data/orders.csv \
#            --out /data/snapshot.json

FROM rust:1.88-bookworm AS build
WORKDIR /src
# Dependencies first, so a source change does not rebuild them.
COPY Cargo.toml Cargo.lock ./
RUN apt-get update && apt-get install -y --no-install-recommends libclang-dev cmake \
    && rm -rf /var/lib/apt/lists/*
RUN mkdir -p src benches examples \
    && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && echo 'fn main() {}' > benches/model.rs && echo 'fn main() {}' > benches/pipeline.rs \
    && echo 'fn main() {}' > examples/kmeans_inertia.rs \
    && cargo build --release --locked \
    && rm -rf src benches examples
COPY . .
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin segmentd

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 segmentd
COPY --from=build /src/target/release/segmentd /usr/local/bin/segmentd
COPY config/segmentd.toml /etc/segmentd/segmentd.toml
ENV SEGMENTD_CONFIG=/etc/segmentd/segmentd.toml
USER segmentd
WORKDIR /data
ENTRYPOINT ["segmentd"]
CMD ["run"]
