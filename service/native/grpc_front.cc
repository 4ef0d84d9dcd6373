// vitserve-grpc-front: gRPC's transport in C++, every call answered by the Python worker that started it.
//
// Why it exists: grpc.aio costs ~0.3 ms of server CPU per call before any work (its C core, the Cython layer and the
// poller thread waking the event loop, docs/serving.md "The front door"), more than the rest of the door together.
// Here gRPC's C++ callback server terminates HTTP/2 and each call crosses to the worker as frames on one inherited
// Unix socket, where the same servicers, interceptors, health and reflection run as under grpc.aio
// (service/grpc_native.py). This file is only a transport: it knows no method, message or error of the service.
//
// Frames, both ways: u32 length (of what follows) | u8 kind | u64 call id | body. Little-endian.
//   to the worker:   START  method, deadline (ms left, -1 = none), peer, metadata, then the first message if any
//                    MESSAGE a further request message (client-streaming methods only)
//                    HALF_CLOSE the client sent its last message (client-streaming methods only)
//                    CANCEL the client cancelled, or the deadline passed: gRPC has answered already
//   from the worker: MESSAGE a response message
//                    FINISH  status code, details, trailing metadata, then an optional last message
//   READY (to the worker, call id = the bound port) once the server listens.
//   STOP (from the worker, call id = grace in ms): stop taking calls, answer those in flight within the grace, exit.
// Signals are the worker's to receive: a SIGTERM to the process group (a terminal's Ctrl-C, `kill -- -PGID`) must not
// close gRPC before the worker has drained; the worker sends STOP after its drain, as it stops grpc.aio there.
//
// Usage: vitserve-grpc-front --fd N --address HOST:PORT --max-receive BYTES [--client-streaming M1,M2]
//                            [--tls-cert F --tls-key F]

#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/security/server_credentials.h>
#include <signal.h>
#include <sys/prctl.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <fstream>
#include <iostream>
#include <memory>
#include <mutex>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <unordered_map>

namespace {

enum Kind : uint8_t { START = 1, MESSAGE = 2, HALF_CLOSE = 3, CANCEL = 4, FINISH = 5, READY = 6, STOP = 7 };

int worker_fd = -1;
std::mutex write_mutex;  // one frame at a time on the socket
std::set<std::string> client_streaming;
std::mutex stop_mutex;
std::condition_variable stop_requested;
int64_t stop_grace_ms = -1;

class Call;
std::mutex calls_mutex;
std::unordered_map<uint64_t, std::shared_ptr<Call>> calls;  // calls the worker may still answer
std::atomic<uint64_t> next_id{1};

void put_u32(std::string& s, uint32_t v) { s.append(reinterpret_cast<const char*>(&v), 4); }
void put_str(std::string& s, const char* p, size_t n) {
  put_u32(s, static_cast<uint32_t>(n));
  s.append(p, n);
}

std::string frame_head(Kind kind, uint64_t id) {
  std::string f(4, '\0');
  f.push_back(static_cast<char>(kind));
  f.append(reinterpret_cast<const char*>(&id), 8);
  return f;
}

void append_message(std::string& f, grpc::ByteBuffer& message) {
  std::vector<grpc::Slice> slices;
  message.Dump(&slices);
  for (auto& s : slices) f.append(reinterpret_cast<const char*>(s.begin()), s.size());
}

void send_frame(std::string& f) {
  uint32_t length = static_cast<uint32_t>(f.size() - 4);
  std::memcpy(&f[0], &length, 4);
  std::lock_guard<std::mutex> lock(write_mutex);
  const char* p = f.data();
  size_t left = f.size();
  while (left > 0) {
    ssize_t n = write(worker_fd, p, left);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      std::cerr << "vitserve-grpc-front: the worker's socket closed; exiting\n";
      _exit(3);
    }
    p += n;
    left -= static_cast<size_t>(n);
  }
}

// One gRPC call. gRPC owns the reactor until OnDone; the worker's answers find it through `calls` (shared_ptr, so
// the reader thread never touches a finished call), and `mutex` orders the reader's writes with gRPC's callbacks.
class Call : public grpc::ServerGenericBidiReactor {
 public:
  Call(grpc::GenericCallbackServerContext* context, uint64_t id)
      : context_(context), id_(id), streaming_(client_streaming.count(context->method()) > 0) {}

  // Registered before the first read, so an answer can never arrive for a call the reader cannot find.
  static Call* Begin(grpc::GenericCallbackServerContext* context) {
    uint64_t id = next_id++;
    auto call = std::make_shared<Call>(context, id);
    call->self_ = call;  // gRPC's reference, dropped in OnDone
    {
      std::lock_guard<std::mutex> lock(calls_mutex);
      calls[id] = call;
    }
    call->StartRead(&call->request_);
    return call.get();
  }

  void OnReadDone(bool ok) override {
    std::lock_guard<std::recursive_mutex> lock(mutex_);
    if (!started_) {
      started_ = true;
      std::string f = frame_head(START, id_);
      const std::string& method = context_->method();
      put_str(f, method.data(), method.size());
      int64_t left_ms = -1;  // gRPC's "no deadline" is the infinite future
      if (context_->raw_deadline().tv_sec < INT32_MAX) {
        auto left = context_->deadline() - std::chrono::system_clock::now();
        left_ms = std::max<int64_t>(0, std::chrono::duration_cast<std::chrono::milliseconds>(left).count());
      }
      f.append(reinterpret_cast<const char*>(&left_ms), 8);
      std::string peer = context_->peer();
      put_str(f, peer.data(), peer.size());
      const auto& metadata = context_->client_metadata();
      put_u32(f, static_cast<uint32_t>(metadata.size()));
      for (const auto& kv : metadata) {
        put_str(f, kv.first.data(), kv.first.size());
        put_str(f, kv.second.data(), kv.second.size());
      }
      f.push_back(ok ? 1 : 0);
      if (ok) append_message(f, request_);
      send_frame(f);
      if (ok && streaming_) StartRead(&request_);
      return;
    }
    if (ok) {
      std::string f = frame_head(MESSAGE, id_);
      append_message(f, request_);
      send_frame(f);
      StartRead(&request_);
    } else {
      std::string f = frame_head(HALF_CLOSE, id_);
      send_frame(f);
    }
  }

  // From the reader thread: the worker's answers.
  void Write(std::string payload) {
    std::lock_guard<std::recursive_mutex> lock(mutex_);
    if (finished_) return;
    grpc::Slice slice(payload);
    writes_.emplace_back(&slice, 1);
    if (!writing_) WriteNext();
  }

  void Finish(grpc::Status status, std::vector<std::pair<std::string, std::string>> trailers, bool has_last,
              std::string last) {
    std::lock_guard<std::recursive_mutex> lock(mutex_);
    if (finished_) return;
    for (auto& kv : trailers) context_->AddTrailingMetadata(kv.first, kv.second);
    if (has_last) {
      grpc::Slice slice(last);
      writes_.emplace_back(&slice, 1);
    }
    status_ = std::move(status);
    finishing_ = true;
    if (!writing_) WriteNext();
  }

  void OnWriteDone(bool ok) override {
    std::lock_guard<std::recursive_mutex> lock(mutex_);
    writing_ = false;
    writes_.pop_front();
    if (!ok) {  // the client is gone: end the call; the worker hears it as a cancel
      if (!finished_) {
        finished_ = true;
        grpc::ServerGenericBidiReactor::Finish(grpc::Status::CANCELLED);
      }
      return;
    }
    WriteNext();
  }

  // The client cancelled or its deadline passed: gRPC has answered it; tell the worker (it stops the handler) and
  // end the call here, whatever the worker sends later.
  void OnCancel() override {
    std::lock_guard<std::recursive_mutex> lock(mutex_);
    std::string f = frame_head(CANCEL, id_);
    send_frame(f);
    if (finished_ || finishing_) return;
    while (writes_.size() > (writing_ ? 1u : 0u)) writes_.pop_back();
    status_ = grpc::Status::CANCELLED;
    finishing_ = true;
    if (!writing_) WriteNext();
  }

  void OnDone() override {
    std::shared_ptr<Call> keep = std::move(self_);  // the reader may hold another reference: freed after both
    std::lock_guard<std::mutex> lock(calls_mutex);
    calls.erase(id_);
  }

 private:
  // Caller holds mutex_. The last queued message goes with the status when the worker has finished.
  void WriteNext() {
    if (writes_.empty()) {
      if (finishing_ && !finished_) {
        finished_ = true;
        grpc::ServerGenericBidiReactor::Finish(status_);
      }
      return;
    }
    writing_ = true;
    if (finishing_ && writes_.size() == 1) {
      finished_ = true;
      StartWriteAndFinish(&writes_.front(), grpc::WriteOptions(), status_);
    } else {
      StartWrite(&writes_.front());
    }
  }

  grpc::GenericCallbackServerContext* context_;
  uint64_t id_;
  bool streaming_;
  std::shared_ptr<Call> self_;
  std::recursive_mutex mutex_;
  grpc::ByteBuffer request_;
  std::deque<grpc::ByteBuffer> writes_;
  grpc::Status status_;
  bool started_ = false, writing_ = false, finishing_ = false, finished_ = false;
};

class Forward : public grpc::CallbackGenericService {
  grpc::ServerGenericBidiReactor* CreateReactor(grpc::GenericCallbackServerContext* context) override {
    return Call::Begin(context);
  }
};

bool read_exact(char* p, size_t n) {
  while (n > 0) {
    ssize_t r = read(worker_fd, p, n);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return false;
    p += r;
    n -= static_cast<size_t>(r);
  }
  return true;
}

struct Reader {
  const std::string& b;
  size_t at;
  uint32_t u32() {
    uint32_t v;
    std::memcpy(&v, b.data() + at, 4);
    at += 4;
    return v;
  }
  std::string str() {
    uint32_t n = u32();
    std::string s = b.substr(at, n);
    at += n;
    return s;
  }
};

// The worker's answers, in order, on one thread. The worker gone means nothing can be answered: exit, and the
// worker's supervisor (or the orchestrator) restarts the pair.
void read_answers() {
  std::string buffer;
  for (;;) {
    uint32_t length;
    if (!read_exact(reinterpret_cast<char*>(&length), 4)) break;
    buffer.resize(length);
    if (length < 9 || !read_exact(&buffer[0], length)) break;
    Kind kind = static_cast<Kind>(buffer[0]);
    uint64_t id;
    std::memcpy(&id, buffer.data() + 1, 8);
    if (kind == STOP) {
      std::lock_guard<std::mutex> lock(stop_mutex);
      stop_grace_ms = static_cast<int64_t>(id);
      stop_requested.notify_all();
      continue;
    }
    std::shared_ptr<Call> call;
    {
      std::lock_guard<std::mutex> lock(calls_mutex);
      auto it = calls.find(id);
      if (it != calls.end()) call = it->second;
    }
    if (!call) continue;  // cancelled and gone
    Reader r{buffer, 9};
    if (kind == MESSAGE) {
      call->Write(buffer.substr(9));
    } else if (kind == FINISH) {
      uint32_t code = r.u32();
      std::string details = r.str();
      uint32_t count = r.u32();
      std::vector<std::pair<std::string, std::string>> trailers;
      for (uint32_t i = 0; i < count; ++i) {
        std::string k = r.str();
        trailers.emplace_back(k, r.str());
      }
      bool has_last = buffer[r.at] != 0;
      call->Finish(grpc::Status(static_cast<grpc::StatusCode>(code), details), std::move(trailers), has_last,
                   has_last ? buffer.substr(r.at + 1) : std::string());
    }
  }
  std::cerr << "vitserve-grpc-front: the worker's socket closed; exiting\n";
  _exit(3);
}

std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    std::cerr << "vitserve-grpc-front: cannot read " << path << "\n";
    _exit(2);
  }
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

}  // namespace

int main(int argc, char** argv) {
  prctl(PR_SET_PDEATHSIG, SIGKILL);  // the worker that started us is the only one who can answer
  signal(SIGTERM, SIG_IGN);
  signal(SIGINT, SIG_IGN);
  signal(SIGPIPE, SIG_IGN);  // a closed socket is seen by write()
  std::string address, tls_cert, tls_key;
  int max_receive = 4 << 20;
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string k = argv[i], v = argv[i + 1];
    if (k == "--fd") worker_fd = std::stoi(v);
    else if (k == "--address") address = v;
    else if (k == "--max-receive") max_receive = std::stoi(v);
    else if (k == "--tls-cert") tls_cert = v;
    else if (k == "--tls-key") tls_key = v;
    else if (k == "--client-streaming") {
      std::stringstream s(v);
      for (std::string m; std::getline(s, m, ',');) client_streaming.insert(m);
    } else {
      std::cerr << "vitserve-grpc-front: unknown option " << k << "\n";
      return 2;
    }
  }
  if (worker_fd < 0 || address.empty()) {
    std::cerr << "usage: vitserve-grpc-front --fd N --address HOST:PORT [--max-receive BYTES] ...\n";
    return 2;
  }
  std::shared_ptr<grpc::ServerCredentials> credentials = grpc::InsecureServerCredentials();
  if (!tls_cert.empty()) {
    grpc::SslServerCredentialsOptions options;
    options.pem_key_cert_pairs.push_back({slurp(tls_key), slurp(tls_cert)});
    credentials = grpc::SslServerCredentials(options);
  }
  Forward forward;
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(address, credentials, &port);
  builder.SetMaxReceiveMessageSize(max_receive);
  builder.SetMaxSendMessageSize(-1);
  builder.RegisterCallbackGenericService(&forward);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (!server || port == 0) {
    std::cerr << "vitserve-grpc-front: cannot bind the gRPC port " << address << "\n";
    return 2;
  }
  std::string ready = frame_head(READY, static_cast<uint64_t>(port));
  send_frame(ready);
  std::thread(read_answers).detach();

  std::unique_lock<std::mutex> lock(stop_mutex);
  stop_requested.wait(lock, [] { return stop_grace_ms >= 0; });
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::milliseconds(stop_grace_ms));
  return 0;
}
