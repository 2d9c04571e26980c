/* memring: the host-side reference for the channel-throughput benchmark.
 *
 * The same single-producer/single-consumer byte ring the chanbw guest and the peer's
 * sink run through a channel (guests/bench.h: head/tail on separate cache lines, data
 * after 256 bytes, chunks of at most 2048 bytes, stream word k = k*golden+1, consumer
 * sums), but between two host threads pinned to host cores, in ordinary memory.
 *
 *   memring BYTES RING_SIZE CORE_A CORE_B   ->  "memring: bytes=B us=T MB/s=X"
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define DATA 256
#define CHUNK 2048
#define barrier() __asm__ volatile("" ::: "memory")

struct ctl {
    volatile uint64_t head;
    uint64_t pad0[7];
    volatile uint64_t tail;
    uint64_t pad1[7];
};

static unsigned char *region;
static uint64_t total, cap, sum_out;
static int cores[2];

static uint64_t word(uint64_t k) { return k * 0x9E3779B97F4A7C15ULL + 1; }

static void pin(int core)
{
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(core, &set);
    pthread_setaffinity_np(pthread_self(), sizeof set, &set);
}

static void *producer(void *arg)
{
    (void)arg;
    pin(cores[0]);
    struct ctl *c = (struct ctl *)region;
    volatile uint64_t *data = (volatile uint64_t *)(region + DATA);
    uint64_t head = 0, k = 0;
    while (head < total) {
        uint64_t room = cap - (head - c->tail);
        if (!room) {
            __asm__ volatile("pause");
            continue;
        }
        uint64_t pos = head % cap, n = room;
        if (n > cap - pos) n = cap - pos;
        if (n > total - head) n = total - head;
        if (n > CHUNK) n = CHUNK;
        for (uint64_t i = 0; i < n / 8; i++)
            data[pos / 8 + i] = word(k++);
        barrier();
        head += n;
        c->head = head;
    }
    return NULL;
}

static void *consumer(void *arg)
{
    (void)arg;
    pin(cores[1]);
    struct ctl *c = (struct ctl *)region;
    volatile uint64_t *data = (volatile uint64_t *)(region + DATA);
    uint64_t tail = 0, sum = 0;
    while (tail < total) {
        uint64_t head = c->head;
        if (head == tail) {
            __asm__ volatile("pause");
            continue;
        }
        uint64_t pos = tail % cap, n = head - tail;
        if (n > cap - pos) n = cap - pos;
        barrier();
        for (uint64_t i = 0; i < n / 8; i++)
            sum += data[pos / 8 + i];
        barrier();
        tail += n;
        c->tail = tail;
    }
    sum_out = sum;
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc != 5) {
        fprintf(stderr, "usage: memring BYTES RING_SIZE CORE_A CORE_B\n");
        return 2;
    }
    total = strtoull(argv[1], NULL, 0) & ~7ULL;
    uint64_t size = strtoull(argv[2], NULL, 0);
    cores[0] = atoi(argv[3]);
    cores[1] = atoi(argv[4]);
    cap = size - DATA;
    region = aligned_alloc(4096, size);
    memset(region, 0, size);
    uint64_t expect = 0;
    for (uint64_t k = 0; k < total / 8; k++)
        expect += word(k);
    struct timespec t0, t1;
    pthread_t a, b;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    pthread_create(&b, NULL, consumer, NULL);
    pthread_create(&a, NULL, producer, NULL);
    pthread_join(a, NULL);
    pthread_join(b, NULL);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double us = (t1.tv_sec - t0.tv_sec) * 1e6 + (t1.tv_nsec - t0.tv_nsec) / 1e3;
    printf("memring: bytes=%llu us=%.0f MB/s=%.1f\n", (unsigned long long)total, us, total / us);
    if (sum_out != expect) {
        printf("memring: checksum mismatch\n");
        return 1;
    }
    return 0;
}
