"""A real MLLP listener for tests: accepts connections, ACKs (or refuses) every framed message, keeps them."""

import socket
import threading

import hl7

START, END = b"\x0b", b"\x1c\x0d"


class MllpListener:
    def __init__(self, ack_code: str = "AA") -> None:
        self.ack_code = ack_code
        self.messages: list[hl7.Message] = []
        self.raw: list[str] = []
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(0.2)
        self.port = self.server.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> "MllpListener":
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.server.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                connection, _ = self.server.accept()
            except TimeoutError:
                continue
            with connection:
                connection.settimeout(5)
                buffer = b""
                try:
                    while not self._stop.is_set():
                        chunk = connection.recv(65536)
                        if not chunk:
                            break
                        buffer += chunk
                        while END in buffer:
                            frame, buffer = buffer.split(END, 1)
                            text = frame.split(START, 1)[-1].decode("utf-8")
                            message = hl7.parse(text)
                            self.raw.append(text)
                            self.messages.append(message)
                            ack = message.create_ack(ack_code=self.ack_code)
                            connection.sendall(START + str(ack).encode("utf-8") + END)
                except (TimeoutError, OSError):
                    pass
