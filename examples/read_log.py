"""Read committed messages straight from a broker's CXL file, without TCP.

Any process on the broker's machine can do this while the broker runs (or
after it stopped): the reader maps the file read-only and never sees a batch
that is still being written.

    python examples/read_log.py /dev/shm/trio-embarcadero-0 --topic sensors
"""

from __future__ import annotations

import argparse

from trio_embarcadero import open_log


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Read a CXL log file.")
    parser.add_argument("path", help="the broker's cxl.path")
    parser.add_argument("--topic", help="print this topic's messages (default: list topics)")
    parser.add_argument("--start", type=int, default=0, help="first logical offset")
    args = parser.parse_args(argv)
    with open_log(args.path) as log:
        if args.topic is None:
            for topic in log.topics():
                # The topic table counts whole records (64-byte header and
                # padding included); the payload bytes are the messages' own.
                # Views: each payload is only measured, so nothing is copied.
                payload = sum(
                    len(message.payload)
                    for stream in topic.streams
                    for message in log.message_views(topic.name, stream.broker_id)
                )
                print(
                    f"{topic.name}: {topic.messages} messages, {payload} payload bytes "
                    f"({topic.payload_bytes} bytes of records)"
                )
            return 0
        last = args.start - 1
        for message in log.messages(args.topic, start=args.start):
            print(f"{message.offset}: {message.payload.decode(errors='replace')}")
            last = message.offset
        # Call messages() again later with start=last + 1 to read what came since.
        print(f"next offset: {last + 1}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
