import sys
import time

if __name__ == "__main__":
    print("ready", flush=True)
    while True:
        time.sleep(0.1)
